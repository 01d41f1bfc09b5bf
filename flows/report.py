"""What a pipeline run tells people: markdown for Prefect artifacts, built from the run's report dict."""

from __future__ import annotations

import re


def artifact_key(pipeline: str, label: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", f"{pipeline}-{label}".lower())).strip("-")[:120]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _name(report: dict, digest: str) -> str:
    if digest == report["base"]:
        return "base"
    for c in report["candidates"]:
        if c["digest"] == digest:
            return c["name"]
    return digest[:19]


def _average(merge: dict) -> str:
    """A merge's summary as ranked: mean accuracy (%), or mean perplexity for a suite of language-modelling tasks."""
    if merge.get("metric", "accuracy") == "accuracy":
        return f"{_pct(merge['average'])}% accuracy"
    return f"perplexity {merge['average']:.4g}"


def _decision_line(report: dict, merge: dict) -> str:
    promotion = report.get("promotion")
    if promotion is None:
        return "No promotion configured for this pipeline."
    if merge["digest"] != report["best"]:
        best = next(m for m in report["merges"] if m["digest"] == report["best"])
        return (f"Not put to the gate: {_average(merge)}, the best merge ({best['label']}) {_average(best)}.")
    target = f"`{promotion['name']}@{promotion['alias']}`"
    if promotion["decision"] == "unchanged":
        return f"Already holds {target}; no new event."
    lines = [f"**{promotion['decision'].upper()}** for {target} (audit event {promotion['event_id']})."]
    if promotion["checks"]:
        lines += ["", "| rule | observed | threshold | result |", "|---|---|---|---|"]
        lines += [f"| {c['rule']} | {c['observed']} | {c['threshold']} | {'pass' if c['passed'] else 'FAIL ' + c['detail']} |"
                  for c in promotion["checks"]]
    return "\n".join(lines)


def merge_markdown(report: dict, merge: dict) -> str:
    parents = [report["base"]] + [c["digest"] for c in report["candidates"] if c["selected"]]
    tasks = report["tasks"]
    lines = [
        f"# {merge['label']} → `{merge['digest']}`",
        "",
        f"Registered as **{merge['name']}**; pipeline `{report['name']}`, suite `{report['suite']}` "
        f"(`{report['suite_digest'][:23]}…`). {'Merged in this run.' if merge['merged'] else 'Reused from an earlier run of the same pinned recipe.'}",
        "",
        "## Method",
        f"`{merge['method']}` with " + (", ".join(f"`{k}={v}`" for k, v in sorted(merge["parameters"].items())) or "defaults"),
        "",
        "## Inputs",
        "| role | model | digest | relevance |",
        "|---|---|---|---|",
    ]
    for d in parents:
        rel = next((c["relevance"] for c in report["candidates"] if c["digest"] == d), None)
        lines.append(f"| {'base' if d == report['base'] else 'candidate'} | {_name(report, d)} | `{d}` | "
                     f"{'–' if rel is None else f'{rel:+.4f}'} |")
    lines += ["", "## Accuracy (%) next to each parent's", "",
              "| model | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    acc = merge["scores"]["accuracy"]
    lines.append("| **merged** | " + " | ".join(_pct(acc.get(t)) for t in tasks) + f" | **{_average(merge)}** |")
    for d in parents:
        p = report["parents"][d]["accuracy"]
        lines.append(f"| {_name(report, d)} | " + " | ".join(_pct(p.get(t)) for t in tasks) +
                     f" | {_pct(sum(p.values()) / len(p)) if p else ''} |")
    lines += ["", "## Gate", _decision_line(report, merge)]
    return "\n".join(lines) + "\n"


def pipeline_markdown(report: dict) -> str:
    lines = [f"# Pipeline `{report['name']}` on `{report['suite']}`", "",
             "| merge | digest | average | |", "|---|---|---|---|"]
    for m in sorted(report["merges"], key=lambda m: -m["average"] if m.get("metric", "accuracy") == "accuracy"
                    else m["average"]):
        lines.append(f"| {m['label']} | `{m['digest'][:19]}` | {_average(m)} | {'best' if m['digest'] == report['best'] else ''} |")
    lines += ["", "## Candidates", "| candidate | digest | relevance | merged |", "|---|---|---|---|"]
    for c in report["candidates"]:
        rel = "–" if c["relevance"] is None else f"{c['relevance']:+.4f}"
        lines.append(f"| {c['name']} | `{c['digest'][:19]}` | {rel} | {'yes' if c['selected'] else 'no'} |")
    promotion = report.get("promotion")
    if promotion:
        lines += ["", f"## Promotion: {promotion['decision']} `{promotion['name']}@{promotion['alias']}`"]
    return "\n".join(lines) + "\n"
