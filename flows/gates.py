"""A gate's required suites, opened to the digests its evaluations must carry.

A gate names suites as a team thinks of them (a suite file, a built-in name,
some tasks of one, or a digest); the registry checks evaluations by digest, so
an evaluation on a subset of the tasks, or on an edited data file, does not
satisfy a gate that names the whole suite.
"""

from __future__ import annotations

from pathlib import Path

from evaluation.suites import is_suite_file
from flows.suites import suite_for
from registry.promotion import DIGEST, IMPORTED_SUITE, Gate, RequiredSuite, promote
from registry.registry import Registry


def required_suites(gate: Gate, registry: Registry | None = None, zoo_manifest: Path | None = None) -> list[RequiredSuite]:
    out = []
    for requirement in gate.requirements():
        if DIGEST.match(requirement.suite) or requirement.suite == IMPORTED_SUITE:
            out.append(RequiredSuite.by_digest(requirement))
            continue
        suite = suite_for(requirement.suite, requirement.tasks, zoo_manifest, registry=registry)
        label = suite.name if is_suite_file(requirement.suite) else requirement.suite
        if requirement.tasks:
            label += f"[{','.join(requirement.tasks)}]"
        out.append(RequiredSuite(label, suite.digest, tuple(suite.tasks)))
    return out


def promote_through(registry: Registry, model_ref: str, alias: str, gate: Gate | None, actor: str,
                    reason: str | None = None, zoo_manifest: Path | None = None, no_gate: bool = False):
    """`registry.promotion.promote` with the gate's suites opened here (a bad suite file refuses in one line
    before any event is written). No gate: production refuses unless `no_gate`."""
    suites = required_suites(gate, registry, zoo_manifest) if gate is not None else None
    return promote(registry, model_ref, alias, gate, actor, reason, suites, no_gate=no_gate)
