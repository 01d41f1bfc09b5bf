"""A registry's checks of the bytes it keeps: validated digests (remembered by file identity), models registered by
reference still unchanged, damaged stored copies put back. A mixin of `Registry` (its store, digest cache and
session)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.digest_cache import checkpoint_stamp
from merging.errors import MergeyardError
from registry.errors import StoreDamagedError
from registry.model_info import ModelInfo
from registry.schema import Model
from registry.validation import check_names, scan_checkpoint


class StoredBytes:
    def scan(self, ckpt: Checkpoint) -> tuple[str, dict[str, str]]:
        """Validated bytes' digest and tensor checksums: remembered from an earlier read of the very same files
        (merging/checkpoints/digest_cache.py), or validated and hashed in one read now."""
        before = checkpoint_stamp(ckpt)
        hit = self.digests.lookup(ckpt, stamp=before)
        if hit is not None and hit.validated and hit.checksums:
            check_names(ckpt)  # cheap, and the rules may have grown since
            return hit.digest, hit.checksums
        checksums: dict[str, str] = {}
        files: dict[str, str] = {}
        digest = scan_checkpoint(ckpt, checksums, files)
        self.digests.record(ckpt, before, digest, checksums, validated=True, file_sha256=files)
        return digest, checksums

    def verify_reference(self, model: ModelInfo) -> None:
        """A model registered by reference still has the bytes it was registered with: its files' size and time
        unchanged, or, where they changed, the same digest (one read, remembered). Raises StoreDamagedError."""
        if self.store.looks_intact(model.digest):
            return
        path = Path(model.store_path)
        try:
            same = self.digests.digest(Checkpoint(path)) == model.digest
        except (OSError, MergeyardError):
            same = False
        if not same:
            raise StoreDamagedError(f"{path} changed since it was registered by reference as {model.name} "
                                    f"({model.digest[:19]}); ingest it again to register its new bytes")
        self.store.refresh_times(model.digest)

    def checked_input(self, model: ModelInfo) -> Path:
        """The stored copy of a model about to be read (a merge input, an export, a served model): by reference,
        the user's files unchanged (or re-verified by their digest); a stored copy whose sizes and times are as
        recorded (a stat per file), or — where they are not (a home restored from an archive) — whose bytes still
        match their recorded sha256, its times then stamped again. Anything else: StoreDamagedError naming it."""
        if self.store.is_reference(model.digest):
            self.verify_reference(model)
        elif not self.store.looks_intact(model.digest):
            bad = self.store.damaged(model.digest, model.files) if self.store.has(model.digest) else ["all of it"]
            if bad:
                raise StoreDamagedError(f"the stored copy of {model.name} ({model.digest[:19]}) is missing or "
                                        f"changed ({', '.join(bad)}); ingest the original again to restore it "
                                        "(`mergeyard doctor` lists every such model)")
            self.store.refresh_times(model.digest)
        return Path(model.store_path)

    def verify_bytes(self, model: ModelInfo) -> None:
        """Every stored file's sha256 against the record (a read of every byte): bit rot that kept the file's size
        and time shows here. A mismatch marks the entry damaged and raises StoreDamagedError naming the file."""
        if self.store.is_reference(model.digest):
            return  # the user's own files: their digest is checked where they look changed (verify_reference)
        bad = self.store.damaged(model.digest, model.files)
        if bad:
            self.store.mark_damaged(model.digest, bad)
            raise StoreDamagedError(f"the stored copy of {model.name} ({model.digest[:19]}) has changed: {', '.join(bad)} "
                                    "no longer match the sha256 recorded when it was stored; nothing was written; "
                                    "ingest the original again (or `mergeyard reproduce` a merged model) to restore it")

    def restore_if_damaged(self, model: ModelInfo, ckpt: Checkpoint) -> bool:
        """Put back a stored copy that is missing or damaged from `ckpt`, whose digest the caller computed equal to
        the model's. Returns whether it did (recorded in `self.restored`)."""
        if self.store.looks_intact(model.digest):
            return False
        if self.store.is_reference(model.digest):  # the user's own files, just verified by the caller's digest
            self.store.refresh_times(model.digest)
            return False
        if self.store.has(model.digest) and not self.store.damaged(model.digest, model.files):
            self.store.refresh_times(model.digest)  # touched or copied with new times, the same bytes
            return False
        _, files, _ = self.store.put(ckpt, model.digest, replace=True)
        with self.Session.begin() as s:
            s.get(Model, model.id).files = files
        self.restored.append(model.digest)
        return True

    def recorded_checksums(self, model: ModelInfo) -> dict[str, str] | None:
        with self.Session() as s:
            return s.scalar(select(Model.tensor_checksums).where(Model.id == model.id))
