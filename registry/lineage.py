"""Ancestry of a model: one recursive CTE, then one query per kind of detail.

The CTE walks lineage edges from the model to the roots. It uses UNION (not
UNION ALL) so a diamond (a model reached through two parents) is visited once,
which also bounds the walk on any DAG. Then models, merge runs and metric
averages for every node come back in one query each: four queries, whatever
the depth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.schema import Evaluation, LineageEdge, MergeRun, Model


@dataclass
class LineageNode:
    id: int
    digest: str
    name: str
    kind: str
    source_uri: str
    method: str | None = None  # of the run that produced it
    metrics: dict[str, float] = field(default_factory=dict)  # "suite/metric" → mean over tasks
    run_details: dict | None = None  # what that run's method decided (MuDSC's matchings, a MAP pick, ...)
    stored: bool | None = None  # whether its stored copy is there intact (size and time); None: not checked


@dataclass
class LineageEdgeView:
    parent: int
    child: int
    role: str
    weight: float | None
    step: int | None
    tensors: list[str] | None = None  # a `selected` edge (FW-Merging): the tensors this choice built


@dataclass
class LineageGraph:
    root: int
    nodes: dict[int, LineageNode]
    edges: list[LineageEdgeView]

    def parents(self, child: int) -> list[LineageEdgeView]:
        return [e for e in self.edges if e.child == child]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.nodes[self.root].digest,
            "nodes": [vars(n) for n in self.nodes.values()],
            "edges": [{"parent": self.nodes[e.parent].digest, "child": self.nodes[e.child].digest, "role": e.role,
                       "weight": e.weight, "step": e.step, **({"tensors": e.tensors} if e.tensors is not None else {})}
                      for e in self.edges],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_mermaid(self) -> str:
        lines = ["graph BT"]
        for n in self.nodes.values():
            label = f"{n.name}<br/>{n.digest[7:19]}" + (f"<br/>{n.method}" if n.method else "")
            lines.append(f'  m{n.id}["{label}"]')
        for e in self.edges:
            tag = e.role + (f" {e.weight:g}" if e.weight is not None else "") + (f" @{e.step}" if e.step is not None else "")
            lines.append(f"  m{e.parent} -->|{tag}| m{e.child}")
        return "\n".join(lines)


def ancestry_edges(session: Session, model_id: int) -> list[tuple]:
    """(parent_id, child_id, role, weight, step) for every edge above `model_id`."""
    e = LineageEdge.__table__
    seed = select(e.c.parent_id, e.c.child_id, e.c.role, e.c.weight, e.c.step).where(e.c.child_id == model_id)
    walk = seed.cte("ancestry", recursive=True)
    step = select(e.c.parent_id, e.c.child_id, e.c.role, e.c.weight, e.c.step).join(walk, e.c.child_id == walk.c.parent_id)
    walk = walk.union(step)  # UNION: each edge once, even in diamonds
    return session.execute(select(walk)).all()


def lineage(session: Session, model_id: int) -> LineageGraph:
    edges = [LineageEdgeView(p, c, role, w, s) for p, c, role, w, s in ancestry_edges(session, model_id)]
    ids = {model_id} | {e.parent for e in edges} | {e.child for e in edges}
    nodes = {
        m.id: LineageNode(m.id, m.digest, m.name, m.kind, m.source_uri)
        for m in session.scalars(select(Model).where(Model.id.in_(ids)))
    }
    for output_id, method, details in session.execute(
        select(MergeRun.output_model_id, MergeRun.method, MergeRun.details)
        .where(MergeRun.output_model_id.in_(ids), MergeRun.status == "succeeded").order_by(MergeRun.id.desc())
    ):
        nodes[output_id].method, nodes[output_id].run_details = method, details
    for mid, suite, metric, mean in session.execute(
        select(Evaluation.model_id, Evaluation.suite_name, Evaluation.metric, func.avg(Evaluation.value))
        .where(Evaluation.model_id.in_(ids)).group_by(Evaluation.model_id, Evaluation.suite_name, Evaluation.metric)
    ):
        nodes[mid].metrics[f"{suite}/{metric}"] = float(mean)
    # JSON columns cannot go through the walk's UNION (PostgreSQL has no equality on json): read them after
    selected = {(p, c, st): (d or {}).get("tensors") for p, c, st, d in session.execute(
        select(LineageEdge.parent_id, LineageEdge.child_id, LineageEdge.step, LineageEdge.details)
        .where(LineageEdge.child_id.in_(ids), LineageEdge.role == "selected"))}
    for e in edges:
        if e.role == "selected":
            e.tensors = selected.get((e.parent, e.child, e.step))
    edges.sort(key=lambda e: (e.child, e.role != "base", e.step if e.step is not None else -1, e.parent))
    return LineageGraph(model_id, nodes, edges)
