"""The registry at the engine's speed: each input read once, no duplicate copies, nothing collected that lineage needs.

Reads are counted by a spy on the two ways a checkpoint's tensor bytes are read (`Checkpoint.read`, the engine's,
and `Checkpoint.iter_raw`, hashing and validation's): the real methods run, their byte counts are summed per file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.digest import checkpoint_digest
from merging.checkpoints.digest_cache import DigestCache, checkpoint_stamp
from merging.recipes.recipe import parse_recipe
from flows.merge import merge_and_record
from tests.conftest import random_family, save_checkpoint


@pytest.fixture
def reads(monkeypatch):
    """Bytes of tensor data read per file (resolved path), through every reading method of Checkpoint."""
    counts: Counter = Counter()
    real_read, real_raw = Checkpoint.read, Checkpoint.iter_raw

    def read(self, name, rows=None):
        out = real_read(self, name, rows)
        counts[str(Path(self._file_of[name]).resolve())] += out.numel() * out.element_size()
        return out

    def iter_raw(self, name, block_bytes=64 << 20):
        for block in real_raw(self, name, block_bytes):
            counts[str(Path(self._file_of[name]).resolve())] += len(block)
            yield block

    monkeypatch.setattr(Checkpoint, "read", read)
    monkeypatch.setattr(Checkpoint, "iter_raw", iter_raw)
    return counts


def tensor_bytes(path: Path) -> int:
    return Checkpoint(path).nbytes


def family(tmp_path, n=3, seed=0):
    base, models = random_family(n, seed=seed)
    root = tmp_path / "src"
    bp = save_checkpoint(base, root / "base.safetensors")
    return bp, [save_checkpoint(m, root / f"ft{i}.safetensors") for i, m in enumerate(models)]


def test_first_users_of_a_new_digest_cache_at_once_all_record(tmp_path):
    """Switching a new cache file to WAL does not wait on SQLite's busy timeout: two first users at once (the
    merge's prefetch threads) saw "database is locked" about one time in five, and the loser's scan was not
    remembered, so CI counted a third read of that input."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(8)}, str(path))
    ckpt = Checkpoint(path)
    stamp = checkpoint_stamp(ckpt)
    lost = 0
    for attempt in range(40):
        cache = DigestCache(tmp_path / f"cache{attempt}" / "digests.sqlite")
        with ThreadPoolExecutor(4) as pool:
            recorded = list(pool.map(lambda k: cache.record(ckpt, stamp, "sha256:x"), range(4)))
        lost += recorded.count(False) + (cache.lookup(ckpt) is None)
    assert lost == 0


def test_the_digest_cache_misses_on_a_changed_file(tmp_path):
    cache = DigestCache(tmp_path / "cache.sqlite")
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    first = cache.digest(Checkpoint(path))
    assert first == checkpoint_digest(path)
    assert cache.lookup(Checkpoint(path)).digest == first

    # same size, new mtime (new bytes): must not hit
    save_file({"w": torch.ones(64)}, str(path))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cache.lookup(Checkpoint(path)) is None
    second = cache.digest(Checkpoint(path))
    assert second == checkpoint_digest(path) != first

    # same mtime, new size (new bytes, the time set back by hand): must not hit either
    old_mtime = path.stat().st_mtime_ns
    save_file({"w": torch.ones(65)}, str(path))
    os.utime(path, ns=(old_mtime, old_mtime))
    assert path.stat().st_mtime_ns == old_mtime
    assert cache.lookup(Checkpoint(path)) is None
    assert cache.digest(Checkpoint(path)) == checkpoint_digest(path) != second


def test_same_size_same_mtime_new_bytes_still_misses(tmp_path):
    """The hardest case: bytes changed in place, size equal, mtime set back. The inode's ctime still moves."""
    cache = DigestCache(tmp_path / "cache.sqlite")
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    before = path.stat()
    first = cache.digest(Checkpoint(path))
    with open(path, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x3f")  # the last float is now 1.0
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert cache.digest(Checkpoint(path)) == checkpoint_digest(path) != first


def test_ingest_reads_a_new_file_once_and_a_known_one_not_at_all(registry, tmp_path, reads):
    bp, _ = family(tmp_path, n=1)
    model, created = registry.ingest(str(bp))
    assert created
    # validation and the digest share one read (the store's copy is one more pass, by the copy itself)
    assert reads[str(bp.resolve())] == tensor_bytes(bp)
    reads.clear()
    again, created = registry.ingest(str(bp))
    assert not created and again.id == model.id
    assert reads[str(bp.resolve())] == 0


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}),
                                           ("ties", {"density": 0.5, "trim_scope": "per_tensor"})])
def test_a_merge_of_registered_inputs_reads_each_input_exactly_once(registry, tmp_path, reads, method, params):
    """(TIES with the global trim scope reads three times by design: two passes settle the global thresholds.)"""
    bp, mps = family(tmp_path)
    stored = {registry.ingest(str(p))[0].store_path for p in [bp, *mps]}
    reads.clear()
    recipe = parse_recipe({"method": method, "base": str(bp), "models": [{"model": str(m)} for m in mps],
                           "parameters": params})
    recorded = merge_and_record(recipe, registry, name="once")
    per_input = {path: n for path, n in reads.items() if any(path.startswith(str(Path(s).resolve())) for s in stored)}
    assert len(per_input) == 4
    for path, n in per_input.items():
        assert n == tensor_bytes(Path(path)), (path, n)
    # the user's originals were never read again
    assert all(reads[str(p.resolve())] == 0 for p in [bp, *mps])
    assert recorded.model.kind == "merged"


def test_a_fresh_merge_by_reference_reads_each_input_twice_its_scan_and_the_merge(registry, tmp_path, reads):
    """The recipe's new inputs are validated and hashed two at a time before they are ingested one by one
    (flows.merge.prefetch_scans): each ingest then takes its scan from the digest cache, so no input is read a
    third time."""
    bp, mps = family(tmp_path)
    recipe = parse_recipe({"method": "task_arithmetic", "base": str(bp), "models": [{"model": str(m)} for m in mps]})
    merge_and_record(recipe, registry, name="fresh", by_reference=True)
    for p in [bp, *mps]:
        assert reads[str(p.resolve())] == 2 * tensor_bytes(p), p


def test_a_merged_output_is_hashed_as_it_is_written_and_never_read_back(registry, tmp_path, monkeypatch):
    """The store records each shard's sha256 from the engine's writer: renaming the output in reads nothing of it
    (the inputs' bytes are checked against their record while the merge reads them)."""
    import hashlib

    import registry.store as store_module

    hashed = []
    real = store_module._hash_file
    monkeypatch.setattr(store_module, "_hash_file", lambda src, copy_to=None: hashed.append(Path(src).name) or real(src, copy_to))
    bp, mps = family(tmp_path)
    recipe = parse_recipe({"method": "task_arithmetic", "base": str(bp), "models": [{"model": str(m)} for m in mps]})
    for p in [bp, *mps]:
        registry.ingest(str(p))
    hashed.clear()
    recorded = merge_and_record(recipe, registry, name="sharded", max_shard_bytes=tensor_bytes(bp) // 2)
    store_dir = Path(recorded.model.store_path)
    shards = sorted(store_dir.glob("*.safetensors"))
    assert len(shards) >= 2
    # the output's shards are not read back; each stored input is read once more, to check its bytes (#39)
    assert not [n for n in hashed if n in {s.name for s in shards}], hashed
    assert [n for n in hashed if n.endswith(".safetensors")] == ["model.safetensors"] * 4, hashed
    recorded_sha = {f["path"]: f["sha256"] for f in registry.store.files(recorded.model.digest)}
    for shard in shards:
        assert recorded_sha[shard.name] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert registry.store.damaged(recorded.model.digest, registry.store.files(recorded.model.digest)) == []


def test_a_patched_output_is_not_taken_for_what_its_writer_hashed(tmp_path):
    """Global TIES patches written bytes at the end: the streamed sha256 no longer holds and none is offered."""
    import hashlib

    from merging.engine.writer import CheckpointWriter

    writer = CheckpointWriter(tmp_path / "out", [("a", "F32", (4,)), ("b", "F32", (4,))], max_shard_bytes=1 << 20)
    for name in ("a", "b"):
        writer.begin_tensor(name)
        writer.write(name, torch.arange(4, dtype=torch.float32))
    clean = CheckpointWriter(tmp_path / "clean", [("a", "F32", (4,))], max_shard_bytes=1 << 20)
    clean.begin_tensor("a")
    clean.write("a", torch.arange(4, dtype=torch.float32))
    clean.commit_with(lambda digest: {})
    (only,) = (tmp_path / "clean").glob("*.safetensors")
    assert clean.file_sha256 == {only.name: hashlib.sha256(only.read_bytes()).hexdigest()}
    writer.patch("a", torch.tensor([1]), torch.tensor([9.0]))
    writer.commit_with(lambda digest: {})
    assert writer.file_sha256 == {}


def test_the_merged_output_is_renamed_into_the_store_and_mlflow_shares_its_bytes(registry, tmp_path):
    bp, mps = family(tmp_path)
    recorded = merge_and_record(parse_recipe({"method": "task_arithmetic", "base": str(bp),
                                              "models": [{"model": str(m)} for m in mps]}), registry, name="ta")
    store_file = Path(recorded.model.store_path) / "model.safetensors"
    assert store_file.is_file()
    assert not any(p.name.startswith("merge-run-") for p in registry.config.scratch.iterdir())
    # MLflow's artifact is the same inode as the store's copy: the bytes are on disk once
    logged = registry.mirror.client.get_logged_model(recorded.model.mlflow_model_id)
    local = Path(logged.artifact_location.removeprefix("file://"))
    shared = [p for p in local.rglob("model.safetensors")]
    assert shared and all(p.stat().st_ino == store_file.stat().st_ino for p in shared)
    assert not any(p.is_symlink() for p in local.rglob("*"))  # MLflow refuses links out of its artifact directory
    # and MLflow still downloads a real copy of it
    import mlflow

    dst = tmp_path / "download"
    dst.mkdir()
    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.artifact_location, dst_path=str(dst),
                                                   tracking_uri=registry.config.mlflow_tracking_uri))
    (copy,) = list(got.rglob("model.safetensors"))
    assert checkpoint_digest(copy) == recorded.model.digest and copy.stat().st_ino != store_file.stat().st_ino


def test_by_reference_copies_nothing_and_a_changed_file_fails_naming_it(cli, tmp_path, isolated_home):
    bp, mps = family(tmp_path, n=2)
    for p in [bp, *mps]:
        out = json.loads(cli("ingest", p, "--by-reference", "--json").stdout)
        assert out["store_path"] == str(p.resolve())
    store = isolated_home / "store"
    assert not list(store.rglob("*.safetensors"))  # nothing copied
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"method": "task_arithmetic", "base": str(bp), "models": [{"model": str(m)} for m in mps]}))
    cli("merge", recipe, "--name", "by-ref")
    assert len(list(store.rglob("*.safetensors"))) == 1  # the merge's output only
    listed = json.loads(cli("models", "list", "--json").stdout)
    digest = next(m["digest"] for m in listed if m["store_path"] == str(mps[0].resolve()))
    _, models = random_family(2, seed=9)
    save_checkpoint(models[0], mps[0])  # the user overwrites the file with other weights
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(json.dumps({"method": "task_arithmetic", "base": str(bp), "models": [{"model": digest}, {"model": str(mps[1])}]}))
    result = cli("merge", pinned, "--name", "after-change", ok=False)
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and str(mps[0].resolve()) in message and "by reference" in message


def test_a_touched_reference_with_the_same_bytes_still_merges(registry, tmp_path):
    bp, mps = family(tmp_path, n=2)
    infos = [registry.ingest(str(p), by_reference=True)[0] for p in [bp, *mps]]
    st = mps[0].stat()
    os.utime(mps[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    recipe = parse_recipe({"method": "task_arithmetic", "base": infos[0].digest,
                           "models": [{"model": i.digest} for i in infos[1:]]})
    merged = merge_and_record(recipe, registry, name="touched").model
    assert merged.kind == "merged"
    assert registry.store.looks_intact(infos[1].digest)  # its times refreshed once its digest checked out


def test_gc_frees_only_what_no_row_needs(cli, tmp_path, isolated_home):
    bp, mps = family(tmp_path, n=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"method": "task_arithmetic", "base": str(bp), "models": [{"model": str(m)} for m in mps]}))
    cli("merge", recipe, "--name", "kept")
    store = isolated_home / "store"
    entries = sorted(p.name for p in store.iterdir())
    assert len(entries) == 4  # base, two candidates, the merge: all named by rows and lineage
    # an entry no row names (a registration killed after its copy), by a process that is gone
    orphan = store / ("sha256-" + "ab" * 32)
    orphan.mkdir()
    save_file({"w": torch.zeros(1000)}, str(orphan / "model.safetensors"))
    (orphan / "mergeyard-files.json").write_text("[]")
    (orphan / "mergeyard-origin.json").write_text(json.dumps({"kind": "merged", "owner": "x0-999999999"}))
    old = 1_000_000_000
    os.utime(orphan, (old, old))
    dry = json.loads(cli("gc", "--json").stdout)
    assert [f["subject"] for f in dry["findings"]] == ["sha256:" + "ab" * 32] and dry["bytes"] > 4000
    assert orphan.exists()  # a dry run removes nothing
    done = json.loads(cli("gc", "--apply", "--json").stdout)
    assert done["findings"][0]["fixed"] and not orphan.exists()
    assert sorted(p.name for p in store.iterdir()) == entries
    # everything lineage names still reproduces
    merged = next(m for m in json.loads(cli("models", "list", "--json").stdout) if m["name"] == "kept")
    assert "reproduced" in cli("reproduce", merged["digest"]).stdout.lower()
    assert json.loads(cli("gc", "--json").stdout)["findings"] == []


def test_an_interrupted_output_never_appears_in_the_store(tmp_path, isolated_home):
    """A merge killed while its output moves into the store leaves a temporary directory only (doctor's), never
    an entry under the output's digest."""
    import subprocess
    import sys

    bp, mps = family(tmp_path, n=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"method": "task_arithmetic", "base": str(bp), "models": [{"model": str(m)} for m in mps]}))
    env = {**os.environ, "MERGEYARD_HOME": str(isolated_home)}
    for point in ("merge.writing", "store.moving"):
        run = subprocess.run([sys.executable, "-m", "flows.cli", "merge", str(recipe), "--name", "killed"],
                             env={**env, "MERGEYARD_TEST_CRASH_AT": point}, capture_output=True, text=True, timeout=300)
        assert run.returncode == -9, (point, run.stderr[-2000:])
        store = isolated_home / "store"
        complete = [p for p in store.iterdir() if not p.name.startswith(".")]
        assert len(complete) == 3, (point, complete)  # the three inputs; no output entry
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "merge", str(recipe), "--name", "finished", "--json"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    doctor = subprocess.run([sys.executable, "-m", "flows.cli", "doctor", "--fix", "--json"], env=env,
                            capture_output=True, text=True, timeout=300)
    report = json.loads(doctor.stdout)
    assert all(f["fixed"] for f in report["findings"]), report
    assert not [p for p in (isolated_home / "store").iterdir() if p.name.startswith(".")]


def test_registered_inputs_are_not_checked_finite_again_but_a_direct_merge_checks_them(registry, tmp_path, monkeypatch):
    """Ingest validated every element; a merge from the registry only checks its output (TIES drops NaN checks
    otherwise done per input chunk). A merge of files outside a registry still checks its inputs."""
    import merging.checkpoints.inputs as inputs_module
    from merging.engine import run_merge

    checked = []
    real = inputs_module.check_input_finite
    monkeypatch.setattr(inputs_module, "check_input_finite", lambda ckpt, name, values=None: checked.append(name) or real(ckpt, name, values))
    bp, mps = family(tmp_path)
    ties = {"method": "ties", "base": str(bp), "models": [{"model": str(m)} for m in mps],
            "parameters": {"density": 0.5, "trim_scope": "per_tensor"}}
    recorded = merge_and_record(parse_recipe(ties), registry, name="ties")
    assert checked == []
    direct = run_merge(parse_recipe(ties), tmp_path / "direct")
    assert checked and direct.digest == recorded.model.digest


@pytest.mark.parametrize("kernel", ["copy_file_range", "refused"])
def test_an_ingested_copy_is_made_by_the_kernel_or_else_plainly_and_its_sha256_is_its_own(registry, tmp_path, monkeypatch, kernel):
    """The store's copy of an input is a separate file (never a hard link) whose recorded sha256 is computed from
    it; where copy_file_range is refused (another filesystem, an old kernel) a plain copy is made instead."""
    import errno
    import hashlib

    import registry.store as store_module

    if kernel == "refused":
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(store_module.os, "copy_file_range", refuse)
    bp, _ = family(tmp_path, n=1)
    info, _ = registry.ingest(str(bp))
    stored = Path(info.store_path) / "model.safetensors"
    assert stored.read_bytes() == bp.read_bytes()
    assert stored.stat().st_ino != bp.stat().st_ino and bp.stat().st_nlink == 1  # MLflow links the store's copy, not the source
    (recorded,) = [f for f in registry.store.files(info.digest) if f["path"] == "model.safetensors"]
    assert recorded["sha256"] == hashlib.sha256(bp.read_bytes()).hexdigest() and recorded["bytes"] == bp.stat().st_size
    assert checkpoint_digest(stored) == info.digest


def test_an_ingest_hashes_a_file_in_its_scan_and_does_not_read_its_copy_back(registry, tmp_path, monkeypatch):
    """A file safetensors wrote for one dtype holds its tensors in name order: the scan that takes the digest
    reads it front to back and so hashes the whole file too. A file in another order (mixed dtypes) is hashed
    from its copy. Either way the recorded sha256 is the file's."""
    import hashlib

    import registry.store as store_module

    read_back = []
    real = store_module._hash_file
    monkeypatch.setattr(store_module, "_hash_file",
                        lambda src, copy_to=None: read_back.append(Path(copy_to or src).name) or real(src, copy_to))
    one_dtype = tmp_path / "one.safetensors"
    save_file({"a.weight": torch.randn(64, 32), "b.weight": torch.randn(32), "c.bias": torch.randn(8)}, str(one_dtype))
    mixed = tmp_path / "mixed.safetensors"  # safetensors writes the int64 buffer first: not in name order
    save_file({"a.weight": torch.randn(64, 32), "b.count": torch.arange(5)}, str(mixed))
    for path, hashed_from_copy in ((one_dtype, False), (mixed, True)):
        read_back.clear()
        info, _ = registry.ingest(str(path))
        assert ("model.safetensors" in read_back) is hashed_from_copy, (path.name, read_back)
        (recorded,) = [f for f in registry.store.files(info.digest) if f["path"] == "model.safetensors"]
        assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_changed_under_its_copy_is_hashed_as_copied(tmp_path):
    """The sha256 a scan took is used only if the source kept its identity through the copy."""
    import hashlib

    from merging.checkpoints.digest_cache import file_stamp
    from registry.store import _copy_hashing

    src = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(16)}, str(src))
    stale = ("0" * 64, json.dumps(file_stamp(src)))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: another identity
    out = _copy_hashing(src, tmp_path / "copy.safetensors", stale)
    assert out["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() != stale[0]
