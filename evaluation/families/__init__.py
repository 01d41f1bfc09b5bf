"""Model families by name: how a suite's checkpoints become predictions, losses and gradients.

    text-classification   transformers encoders with one head per task (evaluation.families.text_classification)
    image-classification  vision models: zero-shot heads (the zoo, TA8) or one linear head per task
    causal-lm             AutoModelForCausalLM: multiple-choice log-likelihood accuracy, perplexity

A suite file names its family; a third party adds one through the entry-point
group `mergeyard.families` (name = "module:Class", a subclass of
`evaluation.families.base.Family` with the suite-file constructor of the
built-in ones).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from merging.errors import MergeyardError

# name → "module:Class" for suite files (built-in suites construct their families themselves)
BUILT_IN = {
    "text-classification": "evaluation.families.text_classification:TextClassificationFamily",
    "image-classification": "evaluation.families.vision_heads:VisionHeadsFamily",
    "causal-lm": "evaluation.families.causal_lm:CausalLMFamily",
}
ENTRY_POINT_GROUP = "mergeyard.families"


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def family_names() -> list[str]:
    return sorted(set(BUILT_IN) | set(_plugins()))


def get_family(name: str) -> type:
    """The family class registered as `name`, built in or from a plugin."""
    if name in BUILT_IN:
        module, _, attr = BUILT_IN[name].partition(":")
        return getattr(import_module(module), attr)
    plugin = _plugins().get(name)
    if plugin is None:
        raise MergeyardError(f"unknown model family {name!r}; known: {', '.join(family_names())}")
    try:
        return plugin.load()
    except Exception as exc:  # a broken plugin must not look like a mergeyard bug
        raise MergeyardError(f"the plugin family {name!r} ({plugin.value}) failed to load: {exc}") from None
