"""`mudsc` as a recipe method: MuDSC's parameters plus the calibration data it reads activations on.

    method: mudsc
    models: [tower-seed-1, tower-seed-2]      # no base: the models were trained apart
    parameters: {alpha: 0.5, mode: align, calibration: {suite: ta8-mini, samples: 32}}

`calibration` names data `merging/` never loads: whoever runs the recipe (the
flows) builds it (unlabelled few-shot images of the suite's tasks, and the
suite's architecture) and hands it to the engine, which records its digest.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from merging.runtime.determinism import SingleThread
from merging.methods.hooks import MethodLineage
from merging.methods.registry import MethodParams, Solved, merge_method, path_field
from merging.objective import CalibrationRequest
from merging.algorithms.mudsc import MuDSCParams, mudsc, permutation_spec

PAPER = "https://arxiv.org/abs/2403.01753"


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = path_field("ta8-mini", description="whose inputs calibrate (and whose architecture the models have): "
                            "a name or a suite file")
    tasks: tuple[str, ...] | None = Field(None, description="a subset of the suite's tasks")
    samples: int = Field(32, gt=0, le=100, description="unlabelled few-shot images per task")


class MuDSCRecipeParams(MethodParams, MuDSCParams):
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="calibration data")


def _solve(inputs, params, calibration, progress) -> Solved:
    states = [{name: ckpt.read(name) for name in ckpt.names} for ckpt in inputs.models]
    core = MuDSCParams(**{k: getattr(params, k) for k in MuDSCParams.model_fields})
    batches = calibration.batches()
    with SingleThread():  # the matchings, and so the merged bytes, must not depend on the thread count
        spec = permutation_spec(calibration.create_model(), batches[0] if batches else None)
        result = mudsc(states, spec, calibration.create_model, batches, core, weights=inputs.weights,
                       progress=progress)
    details = {"mudsc": {"alpha": core.alpha, "mode": core.mode, "calibration_digest": calibration.digest,
                         "architecture": spec.architecture, **result.summary()}}
    return Solved({k: v for k, v in result.state.items() if v.is_floating_point()}, details)


def _calibration(params) -> CalibrationRequest:
    spec = params.calibration
    return CalibrationRequest(spec.suite, spec.tasks, spec.samples)


def _lineage(details: dict) -> MethodLineage:
    """For each model, how many of each group's units its matching moved (model 0 is the reference)."""
    out: dict[int, dict] = {}
    for group, entry in details["mudsc"]["groups"].items():
        for i, moved in enumerate(entry["moved"]):
            out.setdefault(i, {"units_moved": {}})["units_moved"][group] = moved
    return MethodLineage(candidate_details=out)


def _describe(details: dict) -> str:
    d = details["mudsc"]
    moved = sum(sum(g["moved"]) for g in d["groups"].values())
    return (f"α={d['alpha']:g} {d['mode']}, {len(d['groups'])} groups, {moved} units moved, "
            f"calibration {d['calibration_digest'][:19]}")


@merge_method("mudsc", params=MuDSCRecipeParams, paper=PAPER, solve=_solve, requires_base=False,
              data=_calibration, suite_param="calibration.suite", tasks_param="calibration.tasks",
              lineage=_lineage, describe=_describe,
              data_digests=lambda details: {"calibration": details["mudsc"]["calibration_digest"]},
              # on fine-tunes of one base MuDSC finds their units already aligned and lands near averaging, which the
              # demo shows side by side (bench/mudsc.py shows what it is for: models trained apart)
              example={"alpha": 0.5, "calibration": {"samples": 32}})
def mudsc_method(inputs, params, state):  # pragma: no cover  (the engine calls solve instead)
    """MuDSC: align (or zip) hidden units under weight + activation similarity, then average; for models
    trained from different initialisations."""
    raise NotImplementedError("MuDSC solves the whole model at once")
