"""What Fisher merging and RegMean share: where their statistics come from, data or registered artifacts.

    parameters: {suite: support.yaml, budget: 64}          measured on the suite's calibration data
    parameters: {statistics: [sha256:…, sha256:…]}          one registered artifact per model, in model order
                                                             (`mergeyard measure MODEL --stat fisher|gram`)

With registered statistics a merge (and its `reproduce`) needs no data at all.
"""

from __future__ import annotations

from pydantic import Field

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import RecipeError
from merging.checkpoints.inputs import MergeInputs
from merging.methods.registry import MethodParams, path_field
from merging.objective import StatisticsRequest


class StatisticsParams(MethodParams):
    suite: str = path_field("ta8-mini", description="whose calibration data the statistics are measured on")
    tasks: tuple[str, ...] | None = Field(None, description="a subset of the suite's tasks")
    budget: int = Field(64, gt=0, description="calibration samples per task")
    model_tasks: tuple[str, ...] | None = Field(
        None, description="the task each model is measured on (default: model i on task i when they pair up, else all)")
    statistics: tuple[str, ...] | None = Field(
        None, description="registered statistics, one per model in order (digests): no data is read")


def request(params: StatisticsParams) -> StatisticsRequest | None:
    if params.statistics:
        return None
    return StatisticsRequest(params.suite, params.tasks, params.budget, params.model_tasks)


def tasks_per_model(params: StatisticsParams, suite_tasks: tuple[str, ...], n_models: int) -> list[list[str]]:
    if params.model_tasks is not None:
        if len(params.model_tasks) != n_models:
            raise RecipeError(f"model_tasks names {len(params.model_tasks)} tasks for {n_models} models")
        return [[t] for t in params.model_tasks]
    if len(suite_tasks) == n_models:
        return [[t] for t in suite_tasks]
    return [list(suite_tasks)] * n_models


def model_state(inputs: MergeInputs, i: int) -> dict:
    """Model i's tensors under the merged names, with the reference's buffers where the model has none."""
    model = inputs.models[i]
    reference = inputs.reference()
    return {n: model.read(n) if n in model.entries else reference.read(n) for n in reference.names}


def registered(inputs: MergeInputs, params: StatisticsParams) -> list[Checkpoint]:
    if len(params.statistics) != len(inputs.models):
        raise RecipeError(f"statistics names {len(params.statistics)} artifacts for {len(inputs.models)} models")
    return [inputs.open(ref) for ref in params.statistics]


def lineage_details(details: dict, key: str) -> dict[int, dict]:
    """Each candidate's edge names the statistics it was merged with."""
    digests = details[key].get("statistics") or []
    return {i: {"statistics": d} for i, d in enumerate(digests) if d}
