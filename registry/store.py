"""The content-addressed model store: MERGEYARD_HOME/store/<digest>/.

The registry keeps its own copy of every model's safetensors, so lineage can
always be rebuilt from digests even after the original files are gone. A copy
lands in a temporary directory and is renamed into place whole; two processes
storing the same digest at once both end with the one complete copy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from merging.checkpoints.digest_cache import file_stamp
from merging.runtime.atomic import OLD_MARK, move_into_place, temp_beside
from merging.checkpoints.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from merging.checkpoints.companions import MODEL_FILES, companion_files
from merging.runtime.crashpoints import crashpoint
from merging.runtime.processes import owner_token

MANIFEST = "mergeyard-files.json"
# who stored an entry, as what: lets `mergeyard doctor` adopt an ingested copy whose registration was killed
ORIGIN = "mergeyard-origin.json"
# Beside the tensors: the index, what makes the model loadable (config, generation config, tokenizer,
# preprocessor config), a model card and provenance.
COMPANIONS = (INDEX_NAME, *MODEL_FILES, "README.md", "mergeyard.json")


FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, XFS, bcachefs, OCFS2); ext4 says EOPNOTSUPP


def _hash_file(src: Path, copy_to: Path | None = None) -> dict:
    """sha256 and size of `src`; with `copy_to`, of its copy there, made first by the kernel (reflinked where the
    filesystem can, else copy_file_range) and then read back from the page cache: ~0.36 s for 351 MB on ext4,
    where reading, hashing and writing every block in Python took 0.6-1.0 s. The recorded sha256 is the copy's own."""
    if copy_to is not None:
        clone_file(src, copy_to)
        src = copy_to
    h = hashlib.sha256()
    size = 0
    with open(src, "rb", buffering=0) as fin:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while n := fin.readinto(buf):
            h.update(view[:n])
            size += n
    return {"sha256": h.hexdigest(), "bytes": size}


def clone_file(src: Path, dst: Path) -> None:
    """A copy of `src` at `dst`, made by the kernel: reflinked where the filesystem can, else copied."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        if not _reflink(fin, fout):
            _kernel_copy(fin, fout)


def _kernel_copy(fin, fout) -> None:
    """copy_file_range until the end (no bytes through Python); a plain copy where the kernel refuses it."""
    remaining = os.fstat(fin.fileno()).st_size
    try:
        while remaining > 0:
            copied = os.copy_file_range(fin.fileno(), fout.fileno(), min(remaining, 1 << 30))
            if copied == 0:  # the file shrank meanwhile: what is there is copied
                return
            remaining -= copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
            raise
        fin.seek(0)
        fout.seek(0)
        fout.truncate()
        shutil.copyfileobj(fin, fout, 8 << 20)


def _copy_hashing(src: Path, dst: Path, known: tuple[str, str] | None = None) -> dict:
    """Copy `src` to `dst` and hash the copy, unless `known` (sha256, stamp) says what the source's bytes hash to
    and the source kept that stamp through the copy (so the copy holds those very bytes)."""
    if known is None:
        return _hash_file(src, dst)
    sha256, stamp = known
    clone_file(src, dst)
    if json.dumps(file_stamp(src)) != stamp:  # changed under the copy: hash what was copied
        return _hash_file(dst)
    return {"sha256": sha256, "bytes": dst.stat().st_size}


def _move_hashing(src: Path, dst: Path, sha256: str | None = None) -> dict:
    """Rename `src` to `dst` and hash it, unless its writer hashed it as it wrote it (`sha256`): then it is
    never read back."""
    try:
        os.rename(src, dst)
    except OSError as exc:  # another filesystem (a scratch directory set elsewhere): copy
        if exc.errno != errno.EXDEV:
            raise
        return _hash_file(src, dst)
    if sha256 is not None:
        return {"sha256": sha256, "bytes": dst.stat().st_size}
    return _hash_file(dst)


def _reflink(fin, fout) -> bool:
    """Never a hard link: a user editing the original in place would change the store's bytes with it."""
    import fcntl

    try:
        fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        return True
    except OSError:
        return False


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def has(self, digest: str) -> bool:
        return (self.path_for(digest) / MANIFEST).is_file()

    def files(self, digest: str) -> list[dict]:
        return [{k: f[k] for k in ("path", "sha256", "bytes")} for f in self._manifest(digest)]

    def _manifest(self, digest: str) -> list[dict]:
        return json.loads((self.path_for(digest) / MANIFEST).read_text())

    DAMAGED = ".damaged"  # inside an entry: a full read found its bytes changed (cleared when they are put back)

    def mark_damaged(self, digest: str, files: list[str]) -> None:
        """Remember that a read of every byte found `files` changed: the stat check no longer passes it, so a
        re-ingest of the original or `doctor --fix` puts it back."""
        try:
            (self.path_for(digest) / self.DAMAGED).write_text(json.dumps(files))
        except OSError:
            pass

    def looks_intact(self, digest: str) -> bool:
        """Every file there with the size and modification time it was stored with, and not marked damaged (no
        read: a changed or lost file shows here; bytes changed in place without a new mtime take `damaged`, which
        `doctor` and every merge's verified read run)."""
        try:
            manifest = self._manifest(digest)
        except (OSError, ValueError):
            return False
        root = self.path_for(digest)
        if (root / self.DAMAGED).exists():
            return False
        for f in manifest:
            try:
                st = (root / f["path"]).stat()
            except OSError:
                return False
            if st.st_size != f["bytes"] or ("mtime_ns" in f and st.st_mtime_ns != f["mtime_ns"]):
                return False
        return True

    def refresh_times(self, digest: str) -> None:
        """Record the files' current modification times once their bytes were verified (a home restored from an
        archive keeps its bytes but not their nanosecond times)."""
        root = self.path_for(digest)
        (root / self.DAMAGED).unlink(missing_ok=True)
        manifest = [{**f, "mtime_ns": (root / f["path"]).stat().st_mtime_ns} for f in self._manifest(digest)]
        tmp = root / f".{MANIFEST}.{owner_token()}"
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, root / MANIFEST)

    def damaged(self, digest: str, recorded: list[dict]) -> list[str]:
        """The recorded files that are missing or whose sha256 differs (reads every byte)."""
        root = self.path_for(digest)
        bad = []
        for f in recorded:
            path = root / f["path"]
            if f["sha256"] is None:  # a reference: its digest verifies its bytes (Registry.verify_reference)
                if not path.is_file():
                    bad.append(f["path"])
                continue
            if not path.is_file() or path.stat().st_size != f["bytes"] or _hash_file(path)["sha256"] != f["sha256"]:
                bad.append(f["path"])
        return bad

    def origin(self, digest: str) -> dict | None:
        try:
            return json.loads((self.path_for(digest) / ORIGIN).read_text())
        except (OSError, ValueError):
            return None

    def entries(self) -> list[Path]:
        """Every complete entry directory (temporary and replaced ones aside)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def put(self, ckpt: Checkpoint, digest: str, *, replace: bool = False, origin: dict | None = None,
            move: bool = False, written_sha256: dict | None = None) -> tuple[Path, list[dict], bool]:
        """Copy a checkpoint in (if not there yet; with `replace`, over a damaged copy: the caller verified the
        checkpoint's digest). `move`: the checkpoint's files are the registry's own (a merge's output in scratch)
        and are renamed in, not copied. `written_sha256`, by file name: with `move`, the sha256 its writer took as
        it wrote it; else (sha256, stamp) an earlier read took of the source, used if the file still has that stamp
        once copied. Those files are not read again. Returns (path, files with sha256, created)."""
        final = self.path_for(digest)
        if self.has(digest) and not replace:
            return final, self.files(digest), False
        replace = replace or final.exists()  # a directory without its manifest is not an entry: replace it
        tmp = temp_beside(final)
        try:
            files = []
            single = len(ckpt.files) == 1 and not (ckpt.files[0].parent / INDEX_NAME).is_file()
            source_dir = ckpt.files[0].parent
            wanted = [(src, SINGLE_NAME if single else src.name) for src in ckpt.files]
            wanted += [(path, path.name) for path in companion_files(source_dir, COMPANIONS)
                       if not (single and path.name == INDEX_NAME)]
            for src, name in wanted:
                known = (written_sha256 or {}).get(src.name)
                files.append({"path": name, **(_move_hashing(src, tmp / name, known) if move
                                               else _copy_hashing(src, tmp / name, known))})
                if move:
                    crashpoint("store.moving")  # part of a merge's output moved into a temporary entry
            manifest = [{**f, "mtime_ns": (tmp / f["path"]).stat().st_mtime_ns} for f in files]
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            (tmp / ORIGIN).write_text(json.dumps({**(origin or {}), "owner": owner_token()}, indent=2))
            if not move_into_place(tmp, final, replace=replace):  # another process stored the same digest first
                return final, self.files(digest), False
            return final, files, True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def put_reference(self, ckpt: Checkpoint, digest: str, *, origin: dict | None = None) -> tuple[Path, list[dict], bool]:
        """Record a checkpoint by reference: an entry holding only its manifest, whose files are the user's own
        (absolute paths, with the size and modification time they had when their digest was taken; no sha256:
        the digest, recomputed when they look changed, is what verifies them). Nothing is copied."""
        final = self.path_for(digest)
        if self.has(digest):
            return final, self.files(digest), False
        source_dir = ckpt.files[0].parent
        paths = list(ckpt.files) + [path for path in companion_files(source_dir, COMPANIONS) if path not in ckpt.files]
        files = []
        for path in paths:
            st = path.resolve().stat()
            files.append({"path": str(path.resolve()), "sha256": None, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        tmp = temp_beside(final)
        try:
            (tmp / MANIFEST).write_text(json.dumps(files, indent=2))
            (tmp / ORIGIN).write_text(json.dumps({**(origin or {}), "reference": str(Path(ckpt.path).resolve()),
                                                  "owner": owner_token()}, indent=2))
            if not move_into_place(tmp, final):
                return final, self.files(digest), False
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, [{k: f[k] for k in ("path", "sha256", "bytes")} for f in files], True

    def is_reference(self, digest: str) -> bool:
        """Whether the entry names the user's files instead of holding a copy (`ingest --by-reference`)."""
        try:
            return any(Path(f["path"]).is_absolute() for f in self._manifest(digest))
        except (OSError, ValueError):
            return False

    def remove(self, digest: str) -> None:
        """Undo a `put` whose registration failed (only ever for a copy this process created), or drop an entry
        `doctor` found unrecorded: renamed aside first, so a crash never leaves half an entry under its name."""
        self.remove_dir(self.path_for(digest))

    @staticmethod
    def remove_dir(path: Path) -> None:
        if not path.exists():
            return
        aside = path.parent / f".{path.name}{OLD_MARK}{owner_token()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)
