"""`mergeyard demo`: the whole job on a laptop, with no configuration and no servers.

It builds (or reuses) the offline zoo, writes a pipeline YAML next to it and
runs that pipeline: ingest the base and the fine-tunes, score their relevance
to the target tasks, merge with every method, evaluate each merge, promote the
best through a gate. The YAML stays behind, so `mergeyard run` can run it again
(cached: no merge and no evaluation repeat) or a user can edit it.

By default the zoo is the small one (4 fine-tunes, about a minute to build) and
the target is three of its tasks, so one candidate is off-target and the
relevance scores leave it out; `--full` builds all 22 fine-tunes (about 9 minutes on 2 CPU
cores) and targets ta8-mini with four off-target candidates in the pool.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from evaluation.zoo.build import SMALL_TASKS, build_zoo
from evaluation.zoo.tasks import TA8_MINI, TASKS
from merging.methods import all_methods
from flows.settings import Settings

DEMO_NAME = "demo-ta8"


def demo_pipeline(zoo: Path, manifest: dict, full: bool) -> dict:
    """The demo's pipeline config (as YAML data): every method with a demo example, a gate, a nightly schedule."""
    if full:
        targets = list(TA8_MINI)
        off_target = [t for t in TASKS if t not in TA8_MINI][:4]
    else:
        targets, off_target = list(SMALL_TASKS[:3]), list(SMALL_TASKS[3:])
    finetuned = manifest["finetuned"]
    return {
        "name": DEMO_NAME,
        "suite": "ta8-mini",
        "tasks": targets,
        "base": str(zoo / manifest["base"]["path"]),
        "candidates": [str(zoo / finetuned[t]["path"]) for t in targets + off_target],
        "score": {"method": "gradient", "samples_per_task": 100, "top_k": len(targets)},
        # every method with the parameters it registered as its example (fw_hard: step 1 moves far enough in
        # 10 steps on this small tower)
        "merges": [{"method": m.name, "parameters": dict(m.example or {})} for m in all_methods()
                   if m.example is not None],
        "promotion": {
            "alias": "staging",
            # exactly the suite the merges were evaluated on: these tasks of ta8-mini
            "gate": {"name": "demo", "required_suites": [{"suite": "ta8-mini", "tasks": targets}], "min_average": 0.6, "max_regression": 0.0,
                     "lineage": {"allowed_sources": ["file"]}},
        },
        "schedule": {"cron": "0 2 * * *", "timezone": "UTC"},
    }


def prepare_demo(settings: Settings, full: bool = False, progress=None) -> Path:
    """Build or reuse the zoo and write the demo pipeline YAML; returns its path."""
    zoo = Path(settings.zoo_dir).resolve()
    manifest = build_zoo(zoo, small=not full, progress=progress)
    path = Path(settings.demo_dir).resolve() / "pipeline.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(demo_pipeline(zoo, manifest, full), sort_keys=False)
    path.write_text("# written by `mergeyard demo`; run it again with `mergeyard run " + str(path) + "`\n" + text)
    return path
