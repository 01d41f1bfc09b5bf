"""A suite's data files, read into rows: csv, jsonl, parquet, plain text, image folders, hub datasets.

    data/reviews.csv                 a header row, then one example a row
    data/topics.jsonl                one JSON object a line
    data/topics.parquet              a table (pyarrow)
    data/corpus.txt                  language modelling: one document a paragraph (blank-line separated)
    data/photos/                     an image folder: one subfolder a class (`photos/cat/1.png`)
    hf-dataset://NAME[/CONFIG]:SPLIT  a dataset in the local Hugging Face hub cache (never downloaded)

Every table carries the sha256 of the bytes it was read from, so a suite's digest
changes when any of its files does. Errors name the file (and the row).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merging.errors import MergeyardError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_HF_DATASET = re.compile(r"^hf-dataset://(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)"
                         r"(?:/(?P<config>[\w.-]+))?:(?P<split>[\w.-]+)$")


class DataError(MergeyardError):
    """A data file a suite names cannot be read as the suite says."""


@dataclass
class Table:
    source: str  # as the suite file names it
    columns: list[str]
    rows: list[dict[str, Any]]
    digest: str  # sha256 of the bytes read

    def column(self, name: str, what: str) -> list[Any]:
        if name not in self.columns:
            raise DataError(f"{self.source} has no column {name!r} for {what} (its columns: {', '.join(self.columns)})")
        return [row.get(name) for row in self.rows]


def _sha256_file(path: Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_csv(path: Path, source: str) -> Table:
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    return Table(source, list(reader.fieldnames or []), rows, _sha256_file(path))


def _read_jsonl(path: Path, source: str) -> Table:
    rows, columns = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source} line {n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{source} line {n}: a JSON object was expected, not {type(row).__name__}")
        rows.append(row)
        columns.update(dict.fromkeys(row))
    return Table(source, list(columns), rows, _sha256_file(path))


def _read_parquet(paths: list[Path], source: str) -> Table:
    import pyarrow.parquet as pq

    rows, columns = [], []
    h = hashlib.sha256()
    for path in paths:
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid family
            raise DataError(f"{source}: {path.name} is not a readable parquet file ({str(exc).splitlines()[0]})") from None
        columns = columns or table.column_names
        rows += table.to_pylist()
        _sha256_file(path, h)
    return Table(source, columns, rows, h.hexdigest())


def _read_text(path: Path, source: str) -> Table:
    text = path.read_text(encoding="utf-8")
    docs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return Table(source, ["text"], [{"text": d} for d in docs], _sha256_file(path))


def _read_image_folder(path: Path, source: str) -> Table:
    h = hashlib.sha256(b"image-folder")
    rows = []
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for image in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            rel = f"{class_dir.name}/{image.name}"
            h.update(rel.encode() + b"\0")
            _sha256_file(image, h)
            rows.append({"image": str(image), "label": class_dir.name})
    return Table(source, ["image", "label"], rows, h.hexdigest())


def _hf_dataset(ref: str, cache_dir: Path | None) -> Table:
    match = _HF_DATASET.match(ref)
    if not match:
        raise DataError(f"{ref}: expected hf-dataset://NAME[/CONFIG]:SPLIT")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, config, split = match["repo"], match["config"], match["split"]
    try:
        root = Path(snapshot_download(repo, repo_type="dataset", cache_dir=str(cache_dir) if cache_dir else None,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        raise DataError(f"{ref}: dataset {repo!r} is not in the local hub cache (suites never download); fetch it "
                        "once where the network is allowed, or point MERGEYARD_HF_CACHE at a cache that has it") from None
    under = root / config if config else root
    files = sorted(p for p in under.rglob("*.parquet")
                   if p.name.startswith(f"{split}-") or p.name == f"{split}.parquet" or p.parent.name == split)
    if not files:
        raise DataError(f"{ref}: the cached dataset has no parquet files for split {split!r}"
                        + (f" in config {config!r}" if config else ""))
    return _read_parquet(files, ref)


def read_table(ref: str, root: Path, hf_cache: Path | None = None) -> Table:
    """The rows of the data a suite file names (`ref` relative to the suite file's directory `root`)."""
    if ref.startswith("hf-dataset://"):
        return _hf_dataset(ref, hf_cache)
    if "://" in ref:
        raise DataError(f"{ref}: data must be a local file or folder, or hf-dataset://NAME[/CONFIG]:SPLIT")
    path = (root / ref).expanduser()
    if not path.exists():
        raise DataError(f"{ref}: no such file or directory (relative paths are taken from the suite file's folder)")
    try:
        if path.is_dir():
            return _read_image_folder(path, ref)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return _read_csv(path, ref)
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path, ref)
        if suffix == ".parquet":
            return _read_parquet([path], ref)
        if suffix == ".txt":
            return _read_text(path, ref)
    except UnicodeDecodeError:
        raise DataError(f"{ref}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataError(f"{ref}: not valid CSV ({exc})") from None
    raise DataError(f"{ref}: unknown data format {path.suffix!r}; use .csv, .jsonl, .parquet, .txt or an image folder")
