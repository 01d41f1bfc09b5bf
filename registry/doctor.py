"""`mergeyard doctor`: what crashes and lost files left behind, found (dry run) and repaired (`--fix`).

The lineage database is the source of truth. Against it the doctor checks the store (temporary directories of dead
processes, entries no row names, rows whose stored copy is missing or whose bytes differ from their recorded
sha256) and the MLflow mirror (logged models a killed process left PENDING, versions no row records, rows whose
version MLflow lost, aliases MLflow shows elsewhere than the audit log, runs left RUNNING, a pending audit
witness). Nothing a live process owns is touched: owners are told by host and pid (merging.runtime.processes).
"""

from __future__ import annotations

import json

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

from sqlalchemy import select

from merging.runtime.atomic import OLD_MARK, TEMP_MARK
from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.digest import checkpoint_digest
from merging.errors import MergeyardError
from merging.runtime.processes import orphaned_processes, pid_alive
from registry.findings import Finding, owner_gone
from registry.schema import MergeRun, Model

PREFECT_SERVER = "prefect.server.api.server"  # what an ephemeral Prefect server's command line holds


class Doctor:
    def __init__(self, registry, fix: bool = False, progress: Callable | None = None,
                 prefect_home: Path | None = None):
        """`prefect_home`: where this home's ephemeral Prefect servers keep their state (None: a Prefect server
        is configured, no ephemeral ones to look for)."""
        self.registry, self.fix, self.progress, self.prefect_home = registry, fix, progress, prefect_home
        self.findings: list[Finding] = []

    def run(self) -> list[Finding]:
        for run_id in self.registry.reaped:
            self.findings.append(Finding("interrupted-run", f"merge run {run_id}", "its process ended without "
                                         "finishing it", "marked failed (interrupted)", fixed=True))
        self.orphaned_servers()
        self.temporary_directories()
        self.outside_outputs()
        self.store_entries()
        self.stored_copies()
        if self.registry.mirror is not None:
            from registry.mirror_repair import MirrorRepair

            MirrorRepair(self).run()
        return self.findings

    # ---- helpers -------------------------------------------------------------------------------------------

    def found(self, finding: Finding, repair: Callable[[], object] | None = None) -> Finding:
        self.findings.append(finding)
        if self.fix and repair is not None and finding.action:
            try:
                repair()
                finding.fixed = True
            except (MergeyardError, OSError) as exc:
                finding.error = " ".join(str(exc).splitlines())
            except Exception as exc:  # noqa: BLE001  (MLflow's own errors: report, go on with the rest)
                finding.error = f"{type(exc).__name__}: {' '.join(str(exc).splitlines())[:300]}"
        return finding

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    # ---- the store and scratch -----------------------------------------------------------------------------

    def orphaned_servers(self) -> None:
        """The ephemeral Prefect server a killed `mergeyard run` (or `map`, `demo`) started: a child process that
        outlives its parent (re-parented to init), holding a port and this home's Prefect database."""
        if self.prefect_home is None:
            return
        for pid in orphaned_processes(PREFECT_SERVER, "PREFECT_HOME", str(self.prefect_home)):
            self.found(Finding("orphan-server", f"pid {pid}", "an ephemeral Prefect server whose mergeyard process "
                               "is gone", "stop it"), lambda p=pid: _stop(p))

    def temporary_directories(self) -> None:
        cfg = self.registry.config
        for root in (cfg.store_root, cfg.scratch):
            if not Path(root).is_dir():
                continue
            in_store = Path(root) == Path(cfg.store_root)
            for path in sorted(Path(root).iterdir()):
                if in_store and not (path.name.startswith(".") and (TEMP_MARK in path.name or OLD_MARK in path.name)):
                    continue  # a store entry (checked below)
                try:
                    mtime = path.lstat().st_mtime
                except OSError:
                    continue
                run_status = None if in_store else self._merge_run_status(path.name)
                if run_status == "running":
                    continue
                if run_status is not None or owner_gone(path.name, mtime):
                    size = _size(path)
                    self.found(Finding("temp-dir", str(path), f"{size / 1e6:.1f} MB left by a process that "
                                       "is gone", "remove", bytes=size), lambda p=path: self._remove(p))

    def outside_outputs(self) -> None:
        """Outputs written outside the home (`merge --out`, `export`, `extract-lora`) by a process that is gone: its
        note (Registry.tracked_output) names the output, and its `.NAME.tmp-OWNER-*` sibling is what it left."""
        from registry.registry import OUTPUT_NOTES

        notes = Path(self.registry.config.scratch).parent / OUTPUT_NOTES
        for note in sorted(notes.glob("*.json")) if notes.is_dir() else []:
            try:
                record = json.loads(note.read_text())
                out, owner = Path(record["out"]), record["owner"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not owner_gone(owner, note.stat().st_mtime):
                continue
            left = [p for mark in (TEMP_MARK, OLD_MARK) for p in out.parent.glob(f".{out.name}{mark}{owner}-*")]
            if not left:
                self.found(Finding("temp-dir", str(note), f"a note of an output to {out} by a process that is gone, "
                                   "which left nothing", "remove the note"), lambda n=note: n.unlink(missing_ok=True))
            for path in left:
                size = _size(path)
                self.found(Finding("temp-dir", str(path), f"{size / 1e6:.1f} MB of an output to {out} left by a "
                                   "process that is gone", "remove", bytes=size),
                           lambda p=path, n=note: (self._remove(p), n.unlink(missing_ok=True)))

    def _merge_run_status(self, name: str) -> str | None:
        """A merge's scratch output (`merge-run-N`, or its temporary sibling) belongs to run N while it is
        `running`; once the run ended it is an orphan whoever wrote it. None: not a merge output."""
        stem = name.lstrip(".").split(".", 1)[0]
        if not stem.startswith("merge-run-") or not stem[len("merge-run-"):].isdigit():
            return None
        with self.registry.Session() as s:
            status = s.scalar(select(MergeRun.status).where(MergeRun.id == int(stem[len("merge-run-"):])))
        return status or "unknown"

    def store_entries(self, adopt: bool = True) -> None:
        """Entries no row names: adopted when an ingest stored them and their digest verifies (and `adopt`), else
        removed."""
        with self.registry.Session() as s:
            recorded = {self.registry.store.path_for(d).name for d in s.scalars(select(Model.digest))}
        for entry in self.registry.store.entries():
            if entry.name in recorded or not entry.name.startswith("sha256-"):
                continue
            digest = "sha256:" + entry.name.removeprefix("sha256-")
            origin = self.registry.store.origin(digest) or {}
            if owner_gone(origin.get("owner"), entry.stat().st_mtime) is None:
                continue  # its registration may still be under way
            try:
                verified = adopt and checkpoint_digest(Checkpoint(entry)) == digest
            except (MergeyardError, OSError, ValueError):
                verified = False
            size = _size(entry)
            if verified and origin.get("kind") == "ingested" and origin.get("name"):
                self.found(Finding("unrecorded-entry", digest, f"a complete, verified copy of {origin['name']} "
                                   f"({origin.get('source_uri')}) that no row names", "adopt (register it)"),
                           lambda d=digest, o=origin, e=entry: self._adopt(d, o, e))
            else:
                why = ("no model row needs it" if not adopt else "its bytes do not match its name") if not verified \
                    else f"the output of a {origin.get('kind', 'unknown')} registration that never committed"
                self.found(Finding("unrecorded-entry", digest, f"{why}; {size / 1e6:.1f} MB", "remove", bytes=size),
                           lambda d=digest: self.registry.store.remove(d))

    def _adopt(self, digest: str, origin: dict, entry: Path) -> None:
        checksums: dict[str, str] = {}
        ckpt = Checkpoint(entry)
        checkpoint_digest(ckpt, checksums)
        self.registry.register(ckpt, digest, kind="ingested", name=origin["name"], source_uri=origin["source_uri"],
                               revision=origin.get("revision"), architecture=origin.get("architecture"),
                               tensor_checksums=checksums)

    def stored_copies(self) -> None:
        """Every row's stored files against their recorded sha256 (reads every byte)."""
        models = self.registry.list_models()
        task = self.progress("checking stored copies", len(models)) if self.progress else None
        for model in models:
            if task:
                task(1)
            if self.registry.store.is_reference(model.digest):
                self._reference(model)
                continue
            if self.registry.store.has(model.digest):
                bad = self.registry.store.damaged(model.digest, model.files)
                if not bad:
                    if not self.registry.store.looks_intact(model.digest):  # same bytes, other times: restored
                        self.found(Finding("stale-stamp", model.digest, f"{model.name}: its files' bytes are as "
                                           "recorded, their times are not (a home restored from an archive)",
                                           "record their times"),
                                   lambda m=model: self.registry.store.refresh_times(m.digest))
                    continue
                self.registry.store.mark_damaged(model.digest, bad)  # what a stat would miss: bytes changed in place
                detail = f"{', '.join(bad)} differ from the recorded sha256"
            else:
                detail = "its stored copy is missing"
            source = _local_source(model)
            if source is not None:
                self.found(Finding("damaged-entry", model.digest, f"{model.name}: {detail}",
                                   f"restore from {source}"),
                           lambda m=model, src=source: self._restore(m, src))
            else:
                hint = (f"`mergeyard reproduce {model.digest[:19]}` rebuilds and restores it" if model.kind == "merged"
                        else "ingest the original again to restore it")
                self.found(Finding("damaged-entry", model.digest, f"{model.name}: {detail}; {hint}", ""))

    def _reference(self, model) -> None:
        """A model registered by reference: its files unchanged, or changed with the same digest (times refreshed)."""
        try:
            self.registry.verify_reference(model)
        except MergeyardError as exc:
            self.found(Finding("changed-reference", model.digest, str(exc), ""))

    def _restore(self, model, source: Path) -> None:
        ckpt = Checkpoint(source)
        if checkpoint_digest(ckpt) != model.digest:
            raise MergeyardError(f"{source} no longer holds {model.digest[:19]}: ingest the original to restore it")
        if not self.registry.restore_if_damaged(model, ckpt):
            raise MergeyardError("the stored copy checked out on a second look; nothing restored")


def _stop(pid: int, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while pid_alive(pid):
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.time() + grace
        time.sleep(0.1)


def _local_source(model) -> Path | None:
    """Where an ingested model's bytes came from, if that is a local path that still exists."""
    if model.kind != "ingested" or not model.source_uri.startswith("file://"):
        return None
    path = Path(model.source_uri.removeprefix("file://"))
    return path if path.exists() else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
