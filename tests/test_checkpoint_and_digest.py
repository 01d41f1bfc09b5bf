"""Reading checkpoints in every layout, refusing bad ones, and the content digest."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from conftest import random_family, save_checkpoint
from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.digest import checkpoint_digest
from merging.errors import CheckpointError, PickleCheckpointError


def independent_digest(sd: dict[str, torch.Tensor]) -> str:
    """The documented digest, computed straight from the in-memory tensors."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    h = hashlib.sha256(b"mergeyard-digest-v1")
    for name in sorted(sd):
        t = sd[name].contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        for field in (name.encode(), names[t.dtype].encode(), struct.pack(f"<{t.dim()}Q", *t.shape)):
            h.update(struct.pack("<Q", len(field)) + field)
        h.update(struct.pack("<Q", len(raw)) + raw)
    return "sha256:" + h.hexdigest()


@pytest.mark.parametrize("layout", ["file", "dir", "sharded"])
def test_read_every_layout(tmp_path, layout):
    base, _ = random_family(0, seed=1)
    base["ids"] = torch.arange(6)
    path = save_checkpoint(base, tmp_path / ("m.safetensors" if layout == "file" else "m"), layout)
    ckpt = Checkpoint(path)
    assert ckpt.names == sorted(base)
    for name, t in base.items():
        assert torch.equal(ckpt.read(name), t)
    assert torch.equal(ckpt.read("emb.weight", slice(3, 9)), base["emb.weight"][3:9])
    assert ckpt.num_params == sum(t.numel() for t in base.values())


def test_digest_is_independent_of_layout_and_matches_the_definition(tmp_path):
    base, _ = random_family(0, seed=2, dtype=torch.bfloat16)
    base["ids"] = torch.arange(6)
    expected = independent_digest(base)
    for layout, name in (("file", "a.safetensors"), ("dir", "b"), ("sharded", "c")):
        assert checkpoint_digest(save_checkpoint(base, tmp_path / name, layout)) == expected


@pytest.mark.parametrize("change", ["value", "name", "dtype", "shape"])
def test_digest_changes_with_any_content(tmp_path, change):
    base, _ = random_family(0, seed=3)
    other = dict(base)
    if change == "value":
        other["blk.0.b"] = base["blk.0.b"].clone()
        other["blk.0.b"][0] += 1e-6
    elif change == "name":
        other["blk.0.bias"] = other.pop("blk.0.b")
    elif change == "dtype":
        other["blk.0.b"] = base["blk.0.b"].half()
    else:
        other["blk.0.w"] = base["blk.0.w"].reshape(8, 32)
    a = checkpoint_digest(save_checkpoint(base, tmp_path / "a.safetensors"))
    b = checkpoint_digest(save_checkpoint(other, tmp_path / "b.safetensors"))
    assert a != b


def test_truncated_file_is_refused(tmp_path):
    path = save_checkpoint({"w": torch.randn(100)}, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 4, b"not a safetensors file at all", struct.pack("<Q", 20) + b"{broken json......."])
def test_garbage_is_refused(tmp_path, content):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="safetensors"):
        Checkpoint(path)


def test_offsets_inconsistent_with_shape_are_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    with pytest.raises(CheckpointError, match="offsets"):
        Checkpoint(path)


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickles_are_refused(tmp_path, suffix):
    path = tmp_path / f"pytorch_model{suffix}"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(PickleCheckpointError, match="pickle"):
        Checkpoint(path)
    with pytest.raises(PickleCheckpointError):
        Checkpoint(tmp_path)  # a directory holding only the pickle


def test_sharded_index_problems(tmp_path):
    base, _ = random_family(0, seed=4)
    path = save_checkpoint(base, tmp_path / "m", "sharded")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(path)
    index = path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside"):
        Checkpoint(path)
    index.write_text("{}")
    with pytest.raises(CheckpointError, match="malformed"):
        Checkpoint(path)


def test_missing_path_and_ambiguous_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "nope")
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "d" / "a.safetensors")
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "d" / "b.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        Checkpoint(tmp_path / "d")
