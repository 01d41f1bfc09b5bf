"""FW-Merging against a dense, hand-written Frank-Wolfe on a quadratic objective, and on the zoo."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import MergeyardError
import dense_reference as ref
from merging.algorithms.fw import FWParams, fw_hard
from merging.methods.fw import initial_state

SHAPES = {"w1": (6, 5), "w2": (7,), "w3": (3, 2, 2)}


class Quadratic:
    """L(θ) = Σ_n ½‖θ_n − target_n‖², ∇ = θ − target: a loss whose minimiser we choose."""

    def __init__(self, target):
        self.target = target
        self.names = tuple(sorted(target))

    def loss(self, state):
        return float(sum(0.5 * ((state[n].float() - self.target[n]) ** 2).sum() for n in self.names))

    def loss_and_grad(self, state):
        return self.loss(state), {n: state[n].float() - self.target[n] for n in self.names}


def family(tmp_path, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base["ids"] = torch.arange(4)
    cands = [{k: (v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
             for _ in range(n)]
    paths = []
    for i, sd in enumerate([base] + cands):
        p = tmp_path / f"m{i}.safetensors"
        save_file(sd, str(p))
        paths.append(Checkpoint(p))
    return base, cands, paths[0], paths[1:]


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _trim_whole_step(updates, density):
    """TIES's trim of the step over the whole model (the authors' topk_values_mask): sort, keep |u| ≥ the k-th."""
    flat = torch.cat([u.flatten().abs() for u in updates.values()])
    k = flat.numel() - int(flat.numel() * density)
    if k <= 0:
        return updates
    cut = torch.sort(flat).values[k - 1]
    return {n: u * (u.abs() >= cut) for n, u in updates.items()}


def _initial(base, cands, p):
    theta = {k: v.clone().float() if v.is_floating_point() else v.clone() for k, v in base.items()}
    floats = [n for n in base if base[n].is_floating_point()]
    if p.init == "task_arithmetic":
        for n in floats:
            theta[n] = base[n] + p.lam * sum(c[n] - base[n] for c in cands)
    elif p.init == "ties":
        theta.update(ref.ties_global(base, cands, [1.0] * len(cands), p.density, "mean", p.lam))
    return theta


def dense_fw(base, cands, objective, p: FWParams):
    """FW-hard as the authors' code reads: θ_0 a merge of all (and a member of the pool), a cosine oracle per
    tensor or for the model, a step towards the pick (or towards zero), whole tensors, no streaming or caching."""
    names = objective.names
    theta = _initial(base, cands, p)
    pool = [{n: base[n] + p.scale * (c[n] - base[n]) for n in names} for c in cands]
    labels = list(range(len(cands)))
    if p.initial_candidate:
        pool.append({n: theta[n].clone() for n in names})
        labels.append("initial")
    rule = p.no_descent or ("zero" if p.granularity == "layer" else "best")
    picks = []
    for t in range(p.iterations):
        _, grad = objective.loss_and_grad(theta)
        step = 2 / (t + 2) * p.step_size * p.lam
        table = torch.tensor([[_cos(grad[n], m[n] - theta[n] if p.oracle == "direction" else m[n]) for n in names]
                              for m in pool], dtype=torch.float64)
        updates = {}
        for j, n in enumerate(names):
            i = int(table[:, j].argmin()) if p.granularity == "layer" else int(table.sum(1).argmin())
            decisive = table[i, j] if p.granularity == "layer" else table[i].sum()
            if decisive < 0 or rule == "best":
                updates[n] = pool[i][n] - theta[n]
                picks.append((t, n, labels[i]))
            elif rule == "zero":
                updates[n] = -theta[n]
                picks.append((t, n, "zero"))
        if p.inner == "ties":
            updates = _trim_whole_step(updates, p.density)
        theta = {**theta, **{n: theta[n] + step * u for n, u in updates.items()}}
    return theta, picks


@pytest.mark.parametrize("params", [
    FWParams(),
    FWParams(granularity="task", iterations=6, step_size=0.5, lam=1.0),
    FWParams(oracle="direction", iterations=4, step_size=1.0, no_descent="stay", init="base"),
    FWParams(inner="ties", density=0.3, init="ties", iterations=5, step_size=1.0, lam=0.9),
    FWParams(scale=2.5, iterations=5, step_size=1.0, initial_candidate=False, no_descent="best"),
    FWParams(granularity="task", no_descent="zero", iterations=3, step_size=1.0, lam=0.5, init="base"),
], ids=["authors-defaults", "task", "direction-stay-from-base", "ties-init-and-inner", "scaled-atoms-best",
        "task-zero"])
def test_streamed_fw_hard_matches_the_dense_reference(tmp_path, params):
    base, cands, base_ckpt, cand_ckpts = family(tmp_path, 5)
    g = torch.Generator().manual_seed(7)
    # the target lies between candidates 1 and 3, so different tensors prefer different candidates
    target = {n: 0.6 * cands[1][n] + 0.4 * cands[3][n] + 0.05 * torch.randn(cands[1][n].shape, generator=g) for n in SHAPES}
    objective = Quadratic(target)
    got = fw_hard(base_ckpt, cand_ckpts, objective, params, initial=initial_state(base_ckpt, cand_ckpts, params))
    want, picks = dense_fw(base, cands, objective, params)
    for n in base:
        torch.testing.assert_close(got.state[n], want[n], rtol=1e-5, atol=1e-6)
    assert [(s.iteration, s.tensor, s.candidate if s.target == "candidate" else s.target)
            for s in got.selections] == picks
    assert got.state["ids"].dtype == torch.int64 and torch.equal(got.state["ids"], base["ids"])


def test_the_ties_initial_merge_is_ties_of_all_candidates(tmp_path):
    base, cands, base_ckpt, cand_ckpts = family(tmp_path, 4, seed=5)
    got = initial_state(base_ckpt, cand_ckpts, FWParams(init="ties", density=0.3, lam=0.9))
    want = ref.ties_global(base, cands, [1.0] * 4, 0.3, "mean", 0.9)
    for n in SHAPES:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_fw_descends_and_prefers_the_candidate_the_loss_points_to(tmp_path):
    base, cands, base_ckpt, cand_ckpts = family(tmp_path, 6, seed=3)
    objective = Quadratic({n: cands[4][n] for n in SHAPES})
    params = FWParams(iterations=8, step_size=1.0, lam=1.0, oracle="direction", init="base", no_descent="stay",
                      initial_candidate=False)
    result = fw_hard(base_ckpt, cand_ckpts, objective, params)
    assert result.losses[-1] < 0.2 * result.losses[0]
    assert all(b <= a + 1e-9 for a, b in zip(result.losses, result.losses[1:]))
    counts = result.counts(6)
    assert counts.index(max(counts)) == 4
    assert max(range(6), key=lambda i: -result.initial_scores[i]) == 4  # most relevant at θ_0 (most negative)


def test_a_candidate_of_another_architecture_is_refused(tmp_path):
    _, _, base_ckpt, cand_ckpts = family(tmp_path, 2)
    save_file({"other": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(MergeyardError, match="has no tensor 'w1'"):
        fw_hard(base_ckpt, [*cand_ckpts, Checkpoint(tmp_path / "x.safetensors")], Quadratic({n: torch.zeros(s) for n, s in SHAPES.items()}))


def dense_fw_soft(base, cands, task_objectives, merge_objective, p):
    """FusionBench's FW-Soft as written: each task picks the member its gradient's cosine scores lowest, skipping
    what earlier tasks took; the picks merge in with coefficients learned by autograd (or by task arithmetic)."""
    names = merge_objective.names
    theta = _initial(base, cands, p)
    pool = [{n: base[n] + p.scale * (c[n] - base[n]) for n in names} for c in cands]
    for t in range(p.iterations):
        taken, picks = set(), []
        for obj in task_objectives.values():
            _, grad = obj.loss_and_grad(theta)
            totals = {i: sum(_cos(grad[n], m[n] if p.oracle == "weights" else m[n] - theta[n]) for n in names)
                      for i, m in enumerate(pool) if i not in taken}
            best = min(totals, key=lambda i: (totals[i], i))
            taken.add(best)
            picks.append(pool[best])
            if len(picks) >= len(pool):
                break
        directions = [{n: m[n] - theta[n] for n in names} for m in picks]
        if p.merge == "task_arithmetic":
            step = p.lam * (2 / (t + 2) * p.step_size if t > 0 else 1.0)
            theta = {**theta, **{n: theta[n] + step * sum(d[n] for d in directions) for n in names}}
            continue
        alpha = torch.full((len(picks), len(names)), p.adam_init if t == 0 else p.adam_init_later, requires_grad=True)
        opt = torch.optim.Adam([alpha], lr=p.adam_lr)
        for _ in range(p.adam_steps):
            merged = {n: theta[n] + sum(alpha[k, j] * d[n] for k, d in enumerate(directions)) for j, n in enumerate(names)}
            loss = sum(0.5 * ((merged[n] - merge_objective.target[n]) ** 2).sum() for n in names)
            opt.zero_grad()
            loss.backward()
            opt.step()
        theta = {**theta, **{n: theta[n] + sum(alpha.detach()[k, j] * d[n] for k, d in enumerate(directions))
                              for j, n in enumerate(names)}}
    return theta


@pytest.mark.parametrize("params", [
    dict(iterations=3, adam_steps=15, adam_lr=0.05),
    dict(iterations=2, merge="task_arithmetic", step_size=0.5),
    dict(iterations=1, merge="task_arithmetic", lam=0.3),  # the authors' per-task selection: TA of each task's pick
], ids=["adamerging", "task-arithmetic", "per-task-selection"])
def test_fw_soft_matches_the_dense_reference_and_selects_per_task(tmp_path, params):
    from merging.algorithms.fw import FWSoftParams, fw_soft

    base, cands, base_ckpt, cand_ckpts = family(tmp_path, 5, seed=11)
    tasks = {"a": Quadratic({n: cands[1][n] for n in SHAPES}), "b": Quadratic({n: cands[3][n] for n in SHAPES})}
    joint = Quadratic({n: 0.5 * (cands[1][n] + cands[3][n]) for n in SHAPES})
    p = FWSoftParams(**params)
    got = fw_soft(base_ckpt, cand_ckpts, tasks, joint, p)
    want = dense_fw_soft(base, cands, tasks, joint, p)
    for n in SHAPES:
        torch.testing.assert_close(got.state[n], want[n], rtol=1e-4, atol=1e-5)
    assert len({s.candidate for s in got.selections if s.iteration == 0}) == 2  # two tasks, two different picks
    if p.merge == "adamerging":
        assert got.losses[-1] < 0.5 * got.losses[0]


def test_fw_hard_recipe_is_merged_recorded_with_its_selections_and_reproduced(small_zoo, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from merging.engine import run_merge
    from merging.recipes.recipe import load_recipe

    zoo, manifest, _ = small_zoo
    recipe = tmp_path / "fw.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "fw_hard", "base": str(zoo / "base"), "models": [str(zoo / "finetuned" / t) for t in manifest["finetuned"]],
        "parameters": {"suite": "ta8-mini", "tasks": ["digits", "letters"], "iterations": 4, "step_size": 1.0, "budget": 50},
    }))
    with pytest.raises(MergeyardError, match="needs an objective"):
        run_merge(load_recipe(recipe), tmp_path / "out")
    runner = CliRunner()
    merged = runner.invoke(app, ["merge", str(recipe), "--json", "--name", "fw"])
    assert merged.exit_code == 0, merged.output
    digest = json.loads(merged.stdout)["digest"]
    graph = json.loads(runner.invoke(app, ["lineage", digest, "--format", "json"]).stdout)
    selected = [e for e in graph["edges"] if e["role"] == "selected"]
    assert selected and {e["step"] for e in selected} <= {0, 1, 2, 3}
    steps = {e["step"]: e["weight"] for e in selected}
    assert all(steps[t] == pytest.approx(2 / (t + 2) * 1.0 * 0.3) for t in steps)
    for t in steps:  # each tensor is built by at most one candidate per iteration
        built = [name for e in selected if e["step"] == t for name in e["tensors"]]
        assert len(built) == len(set(built))
    names = {n["digest"]: n["name"] for n in graph["nodes"]}
    assert {names[e["parent"]] for e in selected} <= set(manifest["finetuned"])
    rebuilt = runner.invoke(app, ["reproduce", digest, "--json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(rebuilt.stdout[rebuilt.stdout.index("{"):])["ok"]
