"""What `mergeyard doctor` reports: one finding per thing a crash or a lost file left, and how owners are told gone."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from merging.runtime.processes import host_tag, pid_alive, token_owner

UNOWNED_AGE_SECONDS = 24 * 3600  # a temporary directory whose owner cannot be told is left this long


@dataclass
class Finding:
    kind: str  # see FINDING_KINDS
    subject: str  # a path, a digest, a run, NAME@ALIAS
    detail: str
    action: str  # what --fix does, or "" where it cannot repair it itself (the detail says what to do)
    fixed: bool = False
    error: str | None = None
    bytes: int = 0  # what repairing it frees on disk (temporary directories, unrecorded entries)

    def as_dict(self) -> dict:
        return asdict(self)


FINDING_KINDS = {
    "interrupted-run": "a merge run left `running` by a process that is gone (marked failed when the registry opened)",
    "orphan-server": "an ephemeral Prefect server a killed job started, still running",
    "temp-dir": "a temporary directory of a process that is gone",
    "unrecorded-entry": "a store entry no model row names (a registration killed after its copy)",
    "damaged-entry": "a model whose stored copy is missing or whose bytes differ from the recorded sha256",
    "changed-reference": "a model registered by reference whose files changed since (their digest differs)",
    "pending-logged-model": "an MLflow logged model a killed process left PENDING",
    "unrecorded-logged-model": "an MLflow logged model no version and no row records",
    "unrecorded-version": "an MLflow model version the lineage database does not record",
    "missing-version": "a model whose MLflow version is gone (a lost or partial mirror)",
    "alias": "an alias MLflow shows elsewhere than the audit log says",
    "open-mlflow-run": "an MLflow run left RUNNING by a process that is gone",
    "audit-witness": "the audit chain's witness left pending by a promotion killed mid-commit",
    "stale-stamp": "a stored copy whose bytes match their sha256 but whose times do not (a home restored)",
}


def owner_gone(name_or_token: str | None, mtime: float | None = None) -> bool | None:
    """True when the owner token names a dead process on this host; on another host (or with no token), True
    only once `mtime` is older than a day; None: alive, or cannot be told."""
    owner = token_owner(name_or_token or "")
    if owner is not None and owner[0] == host_tag():
        return True if not pid_alive(owner[1]) else None
    if mtime is not None and time.time() - mtime > UNOWNED_AGE_SECONDS:
        return True
    return None
