"""Results measured elsewhere: an lm-evaluation-harness results file (`results_<date>.json`), read as rows.

    {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.71, "acc_stderr,none": 0.009, ...}},
     "groups": {...}, "versions": {"arc_easy": 1.0}, "n-shot": {"arc_easy": 0}, "configs": {...},
     "config": {"model": "hf", "model_args": "pretrained=...", ...}, "lm_eval_version": "0.4.9", "git_hash": "..."}

Each task's metrics become (task, metric, value) rows; a metric under the
harness's default filter `none` keeps its plain name (`acc`, `acc_norm`), any
other filter is kept after a comma (`exact_match,strict-match`), as the harness
prints it. Groups' aggregated metrics are tasks too. The rows are recorded as
imported, with the harness version, the file's sha256 and the model the harness
says it ran, never as mergeyard's own measurement.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from merging.errors import MergeyardError

HARNESS = "lm-evaluation-harness"


class ResultsFileError(MergeyardError):
    """A results file that is not an lm-evaluation-harness results file."""


@dataclass
class ImportedResults:
    rows: list[tuple[str, str, float]]
    provenance: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(t for t, _, _ in self.rows))


def _metric_name(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric},{filt}"


def read_lm_eval_results(path: str | Path) -> ImportedResults:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ResultsFileError(f"{path}: cannot read results ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsFileError(f"{path}: not JSON ({getattr(exc, 'msg', exc)})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not results:
        raise ResultsFileError(f"{path}: no `results` mapping of tasks to metrics: not an lm-evaluation-harness results file")
    rows = []
    sections = [("results", results)] + ([("groups", data["groups"])] if isinstance(data.get("groups"), dict) else [])
    for section, tasks in sections:
        for task, metrics in tasks.items():
            if not isinstance(metrics, dict):
                raise ResultsFileError(f"{path}: {section}.{task} is not a mapping of metrics")
            for key, value in metrics.items():
                if key in ("alias", "name", "sample_len", "sample_count") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    rows.append((str(task), _metric_name(key), float(value)))
    if not rows:
        raise ResultsFileError(f"{path}: its results hold no numeric metrics")
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    provenance = {
        "harness": HARNESS,
        "harness_version": data.get("lm_eval_version") or "unknown (the file does not say)",
        "git_hash": data.get("git_hash"),
        "file": path.name,
        "file_sha256": hashlib.sha256(raw).hexdigest(),
        "model": data.get("model_name") or config.get("model_args") or config.get("model"),
        "versions": data.get("versions"),
        "n_shot": data.get("n-shot"),
        "limit": config.get("limit"),
    }
    return ImportedResults(rows, provenance)
