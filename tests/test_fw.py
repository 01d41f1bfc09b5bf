"""FW-Merging against a dense, hand-written Frank-Wolfe on a quadratic objective, and on the zoo."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from merging.checkpoint import Checkpoint
from merging.errors import MergeyardError
from merging.fw import FWParams, fw_hard

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


def dense_fw(base, cands, objective, p: FWParams):
    """Frank-Wolfe as the formulas read, on whole tensors, without streaming or caching."""
    theta = {k: v.clone().float() if v.is_floating_point() else v.clone() for k, v in base.items()}
    if p.init == "task_arithmetic":
        for n in objective.names:
            theta[n] = theta[n] + p.lam * sum(c[n] - base[n] for c in cands)
    picks = []
    cands = [{n: base[n] + p.scale * (c[n] - base[n]) if base[n].is_floating_point() else c[n] for n in base} for c in cands]
    for t in range(p.iterations):
        _, grad = objective.loss_and_grad(theta)
        gamma = 2 / (t + 2) * p.step_size * p.lam
        table = torch.zeros(len(cands), len(objective.names), dtype=torch.float64)
        for j, n in enumerate(objective.names):
            for i, c in enumerate(cands):
                other = c[n] - theta[n] if p.oracle == "direction" else c[n]
                table[i, j] = torch.nn.functional.cosine_similarity(grad[n].flatten().double(), other.flatten().double(), dim=0)
        if p.granularity == "layer":
            new = dict(theta)
            for j, n in enumerate(objective.names):
                i = int(table[:, j].argmin())
                if table[i, j] < 0:
                    step = cands[i][n] - theta[n]
                    if p.inner == "ties":
                        k = max(1, int(p.density * step.numel()))
                        cut = step.abs().flatten().topk(k).values[-1]
                        step = step * (step.abs() >= cut)
                    new[n] = theta[n] + gamma * step
                    picks.append((t, n, i))
            theta = new
        else:
            i = int(table.sum(1).argmin())
            if table[i].sum() < 0:
                for n in objective.names:
                    theta[n] = theta[n] + gamma * (cands[i][n] - theta[n])
                    picks.append((t, n, i))
    return theta, picks


@pytest.mark.parametrize("params", [
    FWParams(),
    FWParams(granularity="task", iterations=6, step_size=0.5, lam=1.0),
    FWParams(oracle="weights", iterations=4, step_size=1.0),
    FWParams(inner="ties", density=0.3, init="task_arithmetic", iterations=5, step_size=1.0, lam=0.5),
    FWParams(scale=2.5, iterations=5, step_size=1.0),
], ids=["defaults", "task", "weights-oracle", "ties-inner-ta-init", "scaled-atoms"])
def test_streamed_fw_hard_matches_the_dense_reference(tmp_path, params):
    base, cands, base_ckpt, cand_ckpts = family(tmp_path, 5)
    g = torch.Generator().manual_seed(7)
    # the target lies between candidates 1 and 3, so different tensors prefer different candidates
    target = {n: 0.6 * cands[1][n] + 0.4 * cands[3][n] + 0.05 * torch.randn(cands[1][n].shape, generator=g) for n in SHAPES}
    objective = Quadratic(target)
    got = fw_hard(base_ckpt, cand_ckpts, objective, params)
    want, picks = dense_fw(base, cands, objective, params)
    for n in base:
        torch.testing.assert_close(got.state[n], want[n], rtol=1e-5, atol=1e-6)
    assert [(s.iteration, s.tensor, s.candidate) for s in got.selections] == picks
    assert got.state["ids"].dtype == torch.int64 and torch.equal(got.state["ids"], base["ids"])


def test_fw_descends_and_prefers_the_candidate_the_loss_points_to(tmp_path):
    base, cands, base_ckpt, cand_ckpts = family(tmp_path, 6, seed=3)
    objective = Quadratic({n: cands[4][n] for n in SHAPES})
    result = fw_hard(base_ckpt, cand_ckpts, objective, FWParams(iterations=8, step_size=1.0, lam=1.0))
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
    """FW-Soft as written, with autograd through the merged tensors for the coefficients."""
    names = merge_objective.names
    theta = {k: v.clone().float() if v.is_floating_point() else v.clone() for k, v in base.items()}
    for t in range(p.iterations):
        chosen = []
        for obj in task_objectives.values():
            _, grad = obj.loss_and_grad(theta)
            totals = [sum(float(torch.nn.functional.cosine_similarity(grad[n].flatten().double(),
                                                                        (c[n] - theta[n]).flatten().double(), dim=0))
                          for n in names) for c in cands]
            best = min(range(len(cands)), key=lambda i: totals[i])
            if totals[best] < 0 and best not in chosen:
                chosen.append(best)
        if not chosen:
            continue
        alpha = torch.full((len(chosen), len(names)), p.lam, requires_grad=True)
        opt = torch.optim.Adam([alpha], lr=p.adam_lr)
        for _ in range(p.adam_steps):
            merged = dict(theta)
            for j, n in enumerate(names):
                merged[n] = theta[n] + sum(alpha[k, j] * (cands[i][n] - theta[n]) for k, i in enumerate(chosen))
            loss = sum(0.5 * ((merged[n] - merge_objective.target[n]) ** 2).sum() for n in names)
            opt.zero_grad()
            loss.backward()
            opt.step()
        gamma = 2 / (t + 2) * p.step_size
        theta = {**theta, **{n: theta[n] + gamma * sum(alpha.detach()[k, j] * (cands[i][n] - theta[n])
                                                        for k, i in enumerate(chosen)) for j, n in enumerate(names)}}
    return theta


def test_fw_soft_matches_the_dense_reference_and_selects_per_task(tmp_path):
    from merging.fw import FWSoftParams, fw_soft

    base, cands, base_ckpt, cand_ckpts = family(tmp_path, 5, seed=11)
    tasks = {"a": Quadratic({n: cands[1][n] for n in SHAPES}), "b": Quadratic({n: cands[3][n] for n in SHAPES})}
    joint = Quadratic({n: 0.5 * (cands[1][n] + cands[3][n]) for n in SHAPES})
    params = FWSoftParams(iterations=3, step_size=1.0, lam=0.3, adam_steps=15, adam_lr=0.05)
    got = fw_soft(base_ckpt, cand_ckpts, tasks, joint, params)
    want = dense_fw_soft(base, cands, tasks, joint, params)
    for n in SHAPES:
        torch.testing.assert_close(got.state[n], want[n], rtol=1e-4, atol=1e-5)
    assert {s.candidate for s in got.selections if s.iteration == 0} == {1, 3}
    assert got.losses[-1] < 0.5 * got.losses[0]


def test_fw_hard_recipe_is_merged_recorded_with_its_selections_and_reproduced(small_zoo, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from merging.engine import run_merge
    from merging.recipe import load_recipe

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
