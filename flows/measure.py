"""`mergeyard measure`: a model's diagonal Fisher or per-layer Gram matrices on a suite, registered once.

The statistics are a safetensors artifact in the store (kind `statistics`, with its own digest), linked to the
model they measure by a `measured` lineage edge that names the suite digest, the tasks and the budget. Fisher
merging and RegMean take them (`statistics: [...]`) instead of data: a model's author publishes them, others
merge without the training data, and `reproduce` needs none.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors.torch import save_file

from evaluation.evaluator import load_state
from evaluation.statistics import SuiteStatistics
from merging.checkpoints.checkpoint import Checkpoint
from merging.runtime.determinism import SingleThread
from merging.errors import MergeyardError
from flows.resolve import resolve_input
from flows.suites import bound_to, suite_for
from registry.registry import ModelInfo, Registry
from registry.statistics import METADATA_KIND
from merging.runtime.processes import owner_token

STATS = ("fisher", "gram")


def measure(registry: Registry, ref: str, suite_ref: str, stat: str, *, tasks: list[str] | None = None,
            budget: int = 64, device: str = "cpu", zoo_manifest: Path | None = None) -> tuple[ModelInfo, bool]:
    """(the statistics artifact, created) for model `ref` on the suite."""
    if stat not in STATS:
        raise MergeyardError(f"--stat {stat!r}: use fisher or gram")
    suite = suite_for(suite_ref, tasks, zoo_manifest, registry=registry)  # read (and checked) first
    model = resolve_input(registry, ref)
    statistics = SuiteStatistics(bound_to(suite, registry, model), None, budget, device)
    state = statistics.runner.adapt(load_state(model.store_path), model.name)  # a task model: its encoder
    with SingleThread():  # the same bits a merge measuring them itself gets (it runs single-threaded too)
        measured = statistics.fisher(state, list(suite.tasks)) if stat == "fisher" else \
            statistics.grams(state, list(suite.tasks))
    metadata = {METADATA_KIND: stat, "mergeyard.model": model.digest, "mergeyard.suite": suite.name,
                "mergeyard.suite_digest": suite.digest, "mergeyard.data_digest": statistics.digest,
                "mergeyard.tasks": ",".join(suite.tasks), "mergeyard.budget": str(budget)}
    registry.config.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"measure-{owner_token()}-", dir=registry.config.scratch) as tmp:
        save_file({n: t.contiguous() for n, t in measured.items()}, str(Path(tmp) / "model.safetensors"), metadata)
        return registry.register_statistics(Checkpoint(tmp), f"{model.name}-{stat}", f"mergeyard://measure/{model.digest}")
