"""The model card (`README.md`) and machine-readable provenance (`mergeyard.json`)
written beside every merged checkpoint.

The card's YAML front matter follows the Hugging Face model-card metadata for
merges (`base_model`, `base_model_relation: merge`), so the Hub shows the
merge's parents. Neither file is part of the content digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from merging.recipes.recipe import Recipe
from merging.version import __version__


@dataclass(frozen=True)
class InputRecord:
    role: str  # "base" or "model"
    ref: str  # path or URI as the recipe gave it
    digest: str
    weight: float | None = None


def provenance(recipe: Recipe, inputs: list[InputRecord], output_digest: str, environment: dict[str, Any]) -> dict[str, Any]:
    spec = recipe.method_spec
    return {
        "mergeyard_version": __version__,
        "method": {"name": spec.name, "paper": spec.paper},
        "recipe": recipe.canonical(),
        "recipe_hash": recipe.recipe_hash,
        "inputs": [vars(i) for i in inputs],
        "output_digest": output_digest,
        "environment": environment,
    }


def provenance_json(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def render_model_card(record: dict[str, Any]) -> str:
    inputs = record["inputs"]
    front = {
        "base_model": [i["ref"] for i in inputs],
        "base_model_relation": "merge",
        "library_name": "safetensors",
        "tags": ["merge", "mergeyard", record["method"]["name"]],
    }
    rows = "\n".join(
        f"| {i['role']} | `{i['ref']}` | {'' if i['weight'] is None else i['weight']} | `{i['digest']}` |" for i in inputs
    )
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# Merged model `{record['output_digest']}`\n\n"
        f"Made with mergeyard {record['mergeyard_version']} using **{record['method']['name']}** "
        f"([paper]({record['method']['paper']})).\n\n"
        "## Inputs\n\n| role | reference | weight | digest |\n|---|---|---|---|\n" + rows + "\n\n"
        "## Recipe\n\n```yaml\n" + yaml.safe_dump(record["recipe"], sort_keys=False) + "```\n\n"
        f"Recipe hash: `{record['recipe_hash']}`\n\n"
        f"Output digest: `{record['output_digest']}` (sha256 over sorted tensor names, dtypes, shapes and bytes; "
        "`mergeyard digest DIR` recomputes it)\n"
    )
