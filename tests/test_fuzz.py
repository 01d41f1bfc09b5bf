"""Property-based tests over what users hand mergeyard: safetensors headers, recipes, suite files, gates and
source URIs. Every input either parses or raises mergeyard's own one-line error — never another exception, never
a read past the file, never a file written — and sharded indexes cannot lead outside their directory.

A fixed example budget runs in CI; `-m slow` runs the same properties with a larger one.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

from merging.errors import MergeyardError

CI = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
SLOW = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**62), st.floats(allow_nan=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9", 3, None])


@st.composite
def headers(draw):
    """Headers near the format (so the parser's checks are reached), with the fields bent in every way."""
    entries = {}
    for i in range(draw(st.integers(0, 4))):
        shape = draw(st.lists(st.one_of(st.integers(-2, 5), st.floats(-1, 4), st.text(max_size=2)), max_size=3))
        lo = draw(st.one_of(st.integers(-8, 64), st.just(2**62), st.booleans()))
        hi = draw(st.one_of(st.integers(-8, 128), st.just(2**63)))
        entry = {"dtype": draw(DTYPES), "shape": shape, "data_offsets": [lo, hi]}
        if draw(st.booleans()):
            entry = draw(json_values) if draw(st.booleans()) else {k: v for k, v in entry.items() if draw(st.booleans())}
        entries[draw(st.text(min_size=0, max_size=10)) or f"t{i}"] = entry
    if draw(st.booleans()):
        entries["__metadata__"] = draw(json_values)
    return entries


def _safetensors(header, payload: bytes, length_delta: int) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + payload


def _parse_everything(path: Path) -> None:
    from merging.checkpoints.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    for name in ckpt.names:  # every tensor readable, or our error
        ckpt.read(name)


def _safetensors_property(tmp_path, header, payload, delta):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_safetensors(header, payload, delta))
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        _parse_everything(path)
    except MergeyardError as exc:
        assert "\n" not in str(exc)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@CI
@given(headers(), st.binary(max_size=96), st.integers(-16, 16))
def test_the_safetensors_parser_takes_any_header_or_says_why_in_one_line(tmp_path, header, payload, delta):
    _safetensors_property(tmp_path, header, payload, delta)


@CI
@given(st.binary(max_size=200))
def test_the_safetensors_parser_takes_any_bytes_or_says_why_in_one_line(tmp_path, raw):
    path = tmp_path / "raw.safetensors"
    path.write_bytes(raw)
    try:
        _parse_everything(path)
    except MergeyardError as exc:
        assert "\n" not in str(exc)


@st.composite
def recipes(draw):
    base = {"method": draw(st.sampled_from(["ties", "task_arithmetic", "average", "fw_hard", "adamerging", "nope", 3])),
            "base": draw(st.one_of(st.none(), st.text(max_size=10), st.integers())),
            "models": draw(st.one_of(st.lists(st.one_of(st.text(max_size=10), json_values), max_size=3), json_values)),
            "parameters": draw(st.one_of(st.dictionaries(st.sampled_from(["density", "lambda", "suite", "steps",
                                                                          "trim_scope", "alpha", "x"]), scalars),
                                         json_values)),
            "seed": draw(st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), scalars))}
    if draw(st.booleans()):  # weighted entries, their weights anything a number can be
        base["models"] = [{"model": f"m{i}", "weight": draw(st.one_of(st.floats(allow_nan=True), scalars))}
                          for i in range(draw(st.integers(1, 3)))]
    return {k: v for k, v in base.items() if draw(st.booleans())} if draw(st.booleans()) else base


def _recipe_property(data):
    from merging.recipes.recipe import parse_recipe

    try:
        recipe = parse_recipe(data)
    except MergeyardError as exc:
        assert "\n" not in str(exc)
        return
    # what parses holds only numbers a merge can use: a 64-bit seed, finite weights and parameters
    assert 0 <= recipe.seed < 2**63
    assert all(math.isfinite(m.weight) for m in recipe.models)
    assert all(math.isfinite(v) for v in recipe.params().model_dump().values() if isinstance(v, float))


@CI
@given(st.one_of(recipes(), json_values))
def test_any_recipe_parses_or_says_why_in_one_line(data):
    _recipe_property(data)


@st.composite
def suite_documents(draw):
    task = {"name": draw(st.one_of(st.text(max_size=6), st.integers())), "eval": draw(st.sampled_from(
        ["data.csv", "../../etc/passwd", "missing.jsonl", "hf-dataset://x:y", "/abs.txt", 5])),
            "head": draw(st.one_of(st.none(), st.text(max_size=6))),
            "metric": draw(st.sampled_from(["accuracy", "perplexity", "bogus", None])),
            "split": draw(st.one_of(st.none(), json_values))}
    doc = {"name": draw(st.text(max_size=6)), "family": draw(st.sampled_from(["text-classification", "causal-lm",
                                                                               "image-classification", "nope", 1])),
           "tasks": draw(st.one_of(st.lists(st.just(task), max_size=2), json_values)),
           "options": draw(json_values)}
    return {k: v for k, v in doc.items() if draw(st.booleans())} if draw(st.booleans()) else doc


@CI
@given(st.one_of(suite_documents(), json_values), st.booleans())
def test_any_suite_file_loads_or_says_why_in_one_line(tmp_path, doc, as_text):
    from evaluation.suite_file import load_suite_file

    (tmp_path / "data.csv").write_text("text,label\na,0\nb,1\n")
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(doc) if not as_text else str(doc))
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        load_suite_file(path)
    except MergeyardError as exc:
        assert "\n" not in str(exc)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@CI
@given(st.one_of(st.dictionaries(st.sampled_from(["name", "metric", "required_suites", "min_average", "min_per_task",
                                                  "max_regression", "lineage", "allow_imported", "x"]), json_values),
                 json_values))
def test_any_gate_loads_or_says_why_in_one_line(tmp_path, doc):
    from registry.promotion import load_gate

    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_gate(path)
    except MergeyardError as exc:
        assert "\n" not in str(exc)


uris = st.one_of(
    st.text(max_size=30),
    st.builds(lambda s, rest: f"{s}://{rest}", st.sampled_from(["hf", "open_clip", "file", "s3", "HF", "S3", "gs", "x"]),
              st.text(alphabet=st.characters(codec="ascii"), max_size=24)),
)


@CI
@given(uris)
@example("~0")  # a ~user with no such user: pathlib raises RuntimeError (found by this test)
@example("file://~nosuchuser-mergeyard/model")
@example("S3://")  # an upper-case scheme fsspec does not know: raised ValueError (found by this test)
@example("gs://")  # a backend that is not installed
def test_any_source_uri_resolves_or_says_why_in_one_line(tmp_path, uri):
    from merging.references import parse_ref
    from registry.sources import resolve_source

    parse_ref(uri)  # never raises: every text is a path, a URI or a registry reference
    if parse_ref(uri).scheme == "mlflow":  # a well-formed one opens a store: tests/test_serving.py covers those
        return
    scratch = tmp_path / "scratch"
    os.chdir(tmp_path)  # a relative URI that happens to exist is still only read
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        with resolve_source(uri, hf_cache=tmp_path / "hub", scratch=scratch):
            pass
    except MergeyardError as exc:
        assert "\n" not in str(exc)
    leftover = [p for p in tmp_path.iterdir() if p.name not in before and p.name != "scratch"]
    assert not leftover and (not scratch.exists() or not any(scratch.iterdir()))


@pytest.mark.parametrize("uri", ["mlflow://", "mlflow://a", "mlflow://../x/1", "mlflow://n/one", "mlflow://n@",
                                 "mlflow://n@a/b", "mlflow://n m/1"])
def test_malformed_mlflow_uris_are_refused_before_any_store_is_opened(tmp_path, uri):
    from registry.errors import SourceError
    from registry.sources import resolve_source

    os.chdir(tmp_path)
    with pytest.raises(SourceError, match="expected mlflow://NAME/VERSION or mlflow://NAME@ALIAS"):
        with resolve_source(uri, scratch=tmp_path / "scratch"):
            pass
    assert not (tmp_path / "mlruns").exists()


def test_a_sharded_index_cannot_lead_outside_its_directory(tmp_path):
    from safetensors.torch import save_file
    import torch

    from merging.checkpoints.checkpoint import Checkpoint
    from merging.errors import CheckpointError

    outside = tmp_path / "secret.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../secret.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        Checkpoint(model)
    (model / "model-00001-of-00001.safetensors").symlink_to(outside)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="is a link to .*outside the checkpoint directory"):
        Checkpoint(model)


@pytest.mark.slow
@SLOW
@given(headers(), st.binary(max_size=96), st.integers(-16, 16), st.one_of(recipes(), json_values))
def test_the_parsers_hold_under_a_larger_budget(tmp_path, header, payload, delta, recipe):
    _safetensors_property(tmp_path, header, payload, delta)
    _recipe_property(recipe)


@st.composite
def checkpoint_layouts(draw):
    """A checkpoint directory's entries: the shard, and companions that are files, links (inside the directory,
    to a file outside it, dangling), pipes or directories."""
    kinds = st.sampled_from(["file", "link-inside", "link-outside", "dangling", "fifo", "directory"])
    return {name: draw(kinds) for name in draw(st.sets(st.sampled_from(
        ["config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "chat_template.jinja"]), max_size=4))}


def _layout_property(tmp_path, layout):
    import shutil

    import torch
    from safetensors.torch import save_file

    from merging.checkpoints.checkpoint import Checkpoint
    from merging.checkpoints.companions import companion_files

    root = tmp_path / "layout"
    shutil.rmtree(root, ignore_errors=True)
    (root / "model").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(root / "model" / "model.safetensors"))
    (root / "secret.key").write_text("-----BEGIN PRIVATE KEY-----")
    (root / "model" / "own.json").write_text("{}")
    for name, kind in layout.items():
        path = root / "model" / name
        if kind == "file":
            path.write_text("{}")
        elif kind == "link-inside":
            path.symlink_to(root / "model" / "own.json")
        elif kind == "link-outside":
            path.symlink_to(root / "secret.key")
        elif kind == "dangling":
            path.symlink_to(root / "nowhere")
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
    try:
        Checkpoint(root / "model")
        found = companion_files(root / "model")
    except MergeyardError as exc:
        assert "\n" not in str(exc)
        bad = {"link-outside", "dangling", "fifo", "directory"}
        assert bad & set(layout.values()), exc
        return
    assert all(p.resolve().parent == (root / "model").resolve() for p in found)  # nothing from outside
    assert not {"link-outside", "dangling", "fifo", "directory"} & set(layout.values())


@CI
@given(checkpoint_layouts())
def test_a_checkpoint_directory_gives_only_its_own_regular_files(tmp_path, layout):
    _layout_property(tmp_path, layout)
