"""`mergeyard gc`: disk no registered model and no lineage row needs, found (dry run) and freed (`--apply`).

What it frees: store entries no model row names (a registration that never committed, an entry left by a
crash; unlike `doctor` it never adopts them) and temporary directories of processes that are gone. What it never
touches: the entry of any model row, whatever its kind, so every lineage edge (which names model rows) keeps its
bytes and `reproduce` keeps its inputs; entries and directories whose owner is alive or cannot be told (the same
owner rules as `doctor`: an ingest under way is never collected).
"""

from __future__ import annotations

from registry.doctor import Doctor
from registry.findings import Finding


def collect(registry, apply: bool = False) -> list[Finding]:
    doctor = Doctor(registry, fix=apply)
    doctor.temporary_directories()
    doctor.store_entries(adopt=False)
    return doctor.findings


def freed_bytes(findings: list[Finding], *, done_only: bool) -> int:
    return sum(f.bytes for f in findings if f.fixed or not done_only)
