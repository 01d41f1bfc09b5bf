"""Rich renderings for the terminal: lineage trees and pipeline reports."""

from __future__ import annotations

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from merging.methods import get_method


def render_tree(graph):
    from rich.tree import Tree

    def label(node_id, edge=None):
        n = graph.nodes[node_id]
        how = f" [cyan]{n.method}[/]" if n.method else f" [dim]{n.source_uri}[/]"
        role = ""
        if edge is not None:
            role = f"[magenta]{edge.role}[/]" + (f" w={edge.weight:g}" if edge.weight is not None else "") + \
                   (f" step {edge.step}" if edge.step is not None else "") + " "
        if edge is not None and edge.role == "selected":  # FW's choice: the parent is already listed as a candidate
            built = edge.tensors or []
            shown = ", ".join(built[:3]) + (f", … ({len(built)} tensors)" if len(built) > 3 else "")
            return f"{role}[bold]{n.name}[/] {n.digest[:19]} built {shown}"
        metrics = "".join(f"  {k}={v:.3f}" for k, v in sorted(n.metrics.items()))
        damaged = "  [bold red]stored copy missing or changed (mergeyard doctor)[/]" if n.stored is False else ""
        return f"{role}[bold]{n.name}[/] {n.digest[:19]}{how}{_decided(n.run_details, n.method)}{metrics}{damaged}"

    def grow(tree, node_id, seen):
        for edge in graph.parents(node_id):
            branch = tree.add(label(edge.parent, edge))
            if edge.role != "selected" and edge.parent not in seen:
                grow(branch, edge.parent, seen | {edge.parent})

    root = Tree(label(graph.root))
    grow(root, graph.root, {graph.root})
    return root


def _decided(details: dict | None, method: str | None = None) -> str:
    """One line of what the producing run decided, where it says more than its recipe."""
    if not details:
        return ""
    said = [search_summary(details["search"])] if "search" in details else []
    if method is not None:
        describe = get_method(method).describe
        if describe is not None and set(details) - {"search", "wrapped_inputs"}:
            said.append(describe(details))
    if said:
        return f" [dim]({escape('; '.join(said))})[/]"
    if "map" in details:
        d = details["map"]
        return f" [dim](MAP front {d['front']} point {d['point']}, preference {d['preference']})[/]"
    return ""


def search_summary(search: dict) -> str:
    """`lambda auto → 0.3 on calibration (0.1: 71.2, 0.3: 74.0, …)`: what an `auto` search tried and chose."""
    tried = ", ".join(f"{t['value']:g}: {100 * t['score']:.1f}" for t in search["tried"])
    return f"{search['parameter']} auto → {search['chosen']:g} on the calibration split ({tried})"


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def report_tables(report: dict) -> Group:
    """Candidates with their relevance, then every model's accuracy per task (parents, then merges)."""
    tasks = report["tasks"]
    cands = Table("candidate", "digest", "relevance", "merged", title=f"relevance to {report['suite']} ({', '.join(tasks)})")
    for c in report["candidates"]:
        cands.add_row(c["name"], c["digest"][:19], "" if c["relevance"] is None else f"{c['relevance']:+.4f}",
                      "[green]yes[/]" if c["selected"] else "[dim]no[/]")
    results = Table("model", *tasks, "average", "", title="accuracy (%)")
    for digest, scores in report["parents"].items():
        label = "base (zero-shot)" if digest == report["base"] else \
            next(c["name"] for c in report["candidates"] if c["digest"] == digest) + " (fine-tuned)"
        acc = scores["accuracy"]
        results.add_row(f"[dim]{label}[/]", *(_pct(acc.get(t)) for t in tasks), _pct(sum(acc.values()) / len(acc)), "")
    for m in report["merges"]:
        acc = m["scores"]["accuracy"]
        best = m["digest"] == report["best"]
        note = ("[bold green]best[/] " if best else "") + ("" if m["merged"] else "[dim](reused)[/]")
        results.add_row(f"[bold]{m['label']}[/]" if best else m["label"], *(_pct(acc.get(t)) for t in tasks),
                        _pct(m["average"]), note)
    return Group(cands, results)


def promotion_table(promotion: dict) -> Group | str:
    target = f"{promotion['name']}@{promotion['alias']}"
    if promotion["decision"] == "unchanged":
        return f"[green]unchanged[/]: {promotion['model'][:19]} already holds {target}; no new audit event"
    table = Table("rule", "observed", "threshold", "", title=f"gate for {target}")
    for c in promotion["checks"]:
        table.add_row(c["rule"], str(c["observed"]), str(c["threshold"]),
                      "[green]pass[/]" if c["passed"] else f"[red]FAIL[/] {c['detail']}")
    verdict = "[green]promoted[/]" if promotion["decision"] == "promoted" else "[red]refused[/]"
    line = f"{verdict} {promotion['model'][:19]} to {target} (audit event {promotion['event_id']})"
    return Group(table, line) if promotion["checks"] else line
