"""A pipeline, as a user writes it in YAML (`mergeyard run PIPELINE.yaml`, `mergeyard serve PIPELINE.yaml`).

    name: nightly-ta8                 # merged models are registered under this name
    suite: ta8-mini                   # what candidates are scored and merges evaluated on
    tasks: [digits, letters]          # optional: a subset of the suite's tasks
    base: file://zoo/base             # a source URI, a path or a registered model
    candidates:                       # URIs, paths or registered models ...
      - file://zoo/finetuned/digits
    candidate_globs:                  # ... and whatever matches these when the run starts
      - /data/incoming/*.safetensors
    score: {method: gradient, samples_per_task: 100, min_relevance: 0.0, top_k: null}
    merges:
      - {method: task_arithmetic, parameters: {lambda: 0.3}}
      - {method: ties, parameters: {density: 0.2, lambda: 1.0}}
    promotion:
      alias: staging
      gate: {required_suites: [ta8-mini], min_average: 0.5, max_regression: 0.0}
    schedule: {cron: "0 2 * * *", timezone: UTC}

Relative paths are taken from the YAML file's directory.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merging.errors import MergeyardError
from merging.methods import get_method
from merging.recipes.recipe import MergeStep
from merging.references import parse_ref
from merging.yaml_input import YamlDoc, read_yaml, validation_problems
from registry.names import NAME
from registry.promotion import Gate, load_gate


class ConfigError(MergeyardError):
    """A pipeline YAML that cannot be run as written."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreConfig(_Strict):
    method: Literal["gradient", "none"] = Field("gradient", description="gradient alignment at the base, or no scoring")
    samples_per_task: int = Field(100, gt=0, description="labelled few-shot samples per task for the gradient")
    min_relevance: float | None = Field(None, description="drop candidates scoring below this from the merges")
    top_k: int | None = Field(None, gt=0, description="keep only the k most relevant candidates")


class MergeSpec(MergeStep):
    """One of a pipeline's merges: a recipe's method part (its inputs are the pipeline's), and a registry name."""

    name: str | None = Field(None, pattern=NAME.pattern, description="registry name (default: the pipeline's name)")


class PromotionConfig(_Strict):
    alias: str = Field("staging", min_length=1)
    gate: Gate | str | None = Field(None, description="a gate inline, or the path of a gate YAML")
    no_gate: bool = Field(False, description="move a protected alias (production) without a gate: recorded")
    actor: str = "mergeyard-pipeline"


class ScheduleConfig(_Strict):
    cron: str
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _valid(self) -> "ScheduleConfig":
        self.prefect_schedule()  # Prefect's own validation of the expression and the time zone
        return self

    def prefect_schedule(self):
        from prefect.client.schemas.schedules import CronSchedule

        try:
            return CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


class PipelineConfig(_Strict):
    name: str = Field(min_length=1, pattern=NAME.pattern, description="the registry name of its merges")
    suite: str
    tasks: list[str] | None = None
    base: str
    candidates: list[str] = Field(default_factory=list)
    candidate_globs: list[str] = Field(default_factory=list)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    merges: list[MergeSpec] = Field(min_length=1)
    promotion: PromotionConfig | None = Field(default_factory=PromotionConfig)
    schedule: ScheduleConfig | None = None
    device: str = "cpu"

    @model_validator(mode="after")
    def _has_candidates(self) -> "PipelineConfig":
        if not self.candidates and not self.candidate_globs:
            raise ValueError("give candidates or candidate_globs")
        return self

    def resolved_candidates(self) -> list[str]:
        """The listed candidates, then each glob's matches (sorted), without repeats."""
        found = list(self.candidates)
        for pattern in self.candidate_globs:
            found += sorted(glob.glob(pattern))
        return list(dict.fromkeys(found))

    def gate(self) -> Gate | None:
        """The promotion's gate; None where the pipeline names none (production then refuses, unless no_gate)."""
        if self.promotion is None or self.promotion.gate is None:
            return None
        if isinstance(self.promotion.gate, Gate):
            return self.promotion.gate
        return load_gate(self.promotion.gate)


def _rebase(value: str, root: Path) -> str:
    """A relative path becomes absolute against the YAML's directory (a glob too); URIs and registry refs stay."""
    if any(ch in value for ch in "*?[") and "://" not in value:
        return str((root / value).resolve())
    ref = parse_ref(value, root)
    if ref.is_file and value.startswith("file://"):
        return f"file://{ref.path}"
    return str(ref)


def parse_pipeline(data: Any, root: Path | None = None, doc: YamlDoc | None = None) -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError("a pipeline is a YAML mapping (name, suite, base, candidates, merges, ...)")
    if root is not None:
        data = dict(data)
        if isinstance(data.get("suite"), str) and (root / data["suite"]).is_file():
            data["suite"] = str((root / data["suite"]).resolve())
        for key in ("base",):
            if isinstance(data.get(key), str):
                data[key] = _rebase(data[key], root)
        for key in ("candidates", "candidate_globs"):
            if isinstance(data.get(key), list):
                data[key] = [_rebase(v, root) if isinstance(v, str) else v for v in data[key]]
        promotion = data.get("promotion")
        if isinstance(promotion, dict) and isinstance(promotion.get("gate"), str):
            data["promotion"] = {**promotion, "gate": str((root / promotion["gate"]).resolve())}
        if isinstance(data.get("merges"), list):
            data["merges"] = [_rebase_parameters(m, root) for m in data["merges"]]
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid pipeline: {validation_problems(exc, doc, root='pipeline')}") from None
    if root is not None and config.promotion is not None and isinstance(config.promotion.gate, Gate):
        config.promotion.gate = config.promotion.gate.rebased(root)  # suite files beside the pipeline
    return config


def _rebase_parameters(merge: Any, root: Path) -> Any:
    """A merge's parameters with relative file paths (a FW suite file) taken from the pipeline's folder."""
    if not isinstance(merge, dict) or not isinstance(merge.get("parameters"), dict):
        return merge
    try:
        method = get_method(str(merge.get("method")))
    except MergeyardError:
        return merge  # validation names the unknown method
    return {**merge, "parameters": method.rebase_paths(merge["parameters"], root)}


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path)
    doc = read_yaml(path, ConfigError, "pipeline")
    try:
        return parse_pipeline(doc.data, path.resolve().parent, doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
