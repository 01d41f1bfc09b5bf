"""MuDSC: matchings against brute force, exact recovery of permuted models, BatchNorm reset, real merges.

Permuted copies are built here by plain indexing, not by mergeyard's transforms, so recovering the
original checks the matching and the transform against an independent construction.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from merging.errors import MergeyardError
from merging.algorithms.mudsc import MuDSCParams, mudsc, permutation_spec
from merging.algorithms.mudsc import matching as M


# ---- matchings ----------------------------------------------------------------------------------


def test_align_finds_the_best_permutation_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.normal(size=(6, 6))
        full = np.zeros((12, 12))
        full[:6, 6:] = s
        target, value = M.align(full, 2, 6)
        best = max(itertools.permutations(range(6)), key=lambda p: sum(s[i, p[i]] for i in range(6)))
        assert value == pytest.approx(sum(s[i, best[i]] for i in range(6)))
        # model 1's unit best[i] becomes merged unit i
        assert [int(target[1, best[i]]) for i in range(6)] == list(range(6))


def test_block_assign_maps_blocks_to_blocks_and_is_optimal_among_such_permutations():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(6, 6))
    cols, value = M.block_assign(s, 3)
    blocks = [set(range(b * 2, b * 2 + 2)) for b in range(3)]
    for g in range(3):
        assert {int(c) for c in cols[g * 2:g * 2 + 2]} in blocks
    allowed = [p for p in itertools.permutations(range(6))
               if all({p[g * 2], p[g * 2 + 1]} in blocks for g in range(3))]
    assert value == pytest.approx(max(sum(s[i, p[i]] for i in range(6)) for p in allowed))


def test_zip_merges_the_most_similar_pairs_within_a_model_unless_told_not_to():
    # units a0 a1 | b0 b1: a0~a1 (0.9), b0~b1 (0.8), every cross pair 0.1
    s = np.full((4, 4), 0.1)
    s[0, 1] = s[1, 0] = 0.9
    s[2, 3] = s[3, 2] = 0.8
    target, value = M.zip_units(s, 2, 2)
    assert target[0, 0] == target[0, 1] and target[1, 0] == target[1, 1] and value == pytest.approx(1.7)
    across, _ = M.zip_units(s, 2, 2, within_model=0.0)
    assert set(across[0].tolist()) == {0, 1} and set(across[1].tolist()) == {0, 1}


def test_zip_of_four_models_makes_clusters_of_four():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(200, 5))
    feats = np.concatenate([base[:, rng.permutation(5)] + 0.05 * rng.normal(size=(200, 5)) for _ in range(4)], 1)
    target, _ = M.zip_units(np.corrcoef(feats.T), 4, 5)
    sizes = np.bincount(target.reshape(-1).numpy(), minlength=5)
    assert sizes.tolist() == [4] * 5
    for c in range(5):  # each cluster holds one unit of every model: the copies of one base feature
        assert sorted(int(m) for m, row in enumerate(target) for u in range(5) if row[u] == c) == [0, 1, 2, 3]


# ---- exact recovery -----------------------------------------------------------------------------


def _mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 24), nn.BatchNorm1d(24), nn.ReLU(),
                         nn.Linear(24, 5))


def _permute_mlp(sd, p1, p2):
    out = dict(sd)
    out["0.weight"], out["0.bias"] = sd["0.weight"][p1], sd["0.bias"][p1]
    out["2.weight"], out["2.bias"] = sd["2.weight"][p2][:, p1], sd["2.bias"][p2]
    for k in ("weight", "bias", "running_mean", "running_var"):
        out[f"3.{k}"] = sd[f"3.{k}"][p2]
    out["5.weight"] = sd["5.weight"][:, p2]
    return out


def _gn_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                         nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12 * 4 * 4, 4))


def _permute_gn_cnn(sd, p1, p2):
    out = dict(sd)
    out["0.weight"], out["0.bias"] = sd["0.weight"][p1], sd["0.bias"][p1]
    out["1.weight"], out["1.bias"] = sd["1.weight"][p1], sd["1.bias"][p1]
    out["3.weight"], out["3.bias"] = sd["3.weight"][p2][:, p1], sd["3.bias"][p2]
    w = sd["7.weight"].view(4, 12, 16)[:, p2]  # the Linear reads channel c at inputs c·16 .. c·16+15
    out["7.weight"] = w.reshape(4, 12 * 16)
    return out


ALL_SETTINGS = [(alpha, mode) for alpha in (0.0, 0.5, 1.0) for mode in ("align", "zip")]


def _assert_recovers(states_original, permuted, spec, create, batches, settings=ALL_SETTINGS, **params):
    for alpha, mode in settings:
        result = mudsc([states_original, permuted], spec, create, batches, MuDSCParams(alpha=alpha, mode=mode, **params))
        for name, value in states_original.items():
            assert torch.equal(result.state[name], value.to(result.state[name].dtype)), (alpha, mode, name)


def test_an_mlp_with_batchnorm_is_recovered_exactly_from_a_permuted_copy():
    torch.manual_seed(0)
    net = _mlp()
    x = torch.randn(128, 10)
    net.train()
    net(x)
    net.eval()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    permuted = _permute_mlp(sd, torch.randperm(32), torch.randperm(24))
    other = _mlp()
    other.load_state_dict(permuted)
    other.eval()
    torch.testing.assert_close(other(x), net(x))  # the same function
    spec = permutation_spec(_mlp(), x)
    assert [g.size for g in spec.groups] == [32, 24] and spec.has_batchnorm
    _assert_recovers(sd, permuted, spec, _mlp, [x], reset_batchnorm=False)


def test_groupnorm_groups_move_as_blocks_and_are_recovered():
    torch.manual_seed(1)
    net = _gn_cnn().eval()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    groups = torch.randperm(2)
    p1 = torch.cat([g * 4 + torch.randperm(4) for g in groups])  # whole GroupNorm groups, shuffled inside
    permuted = _permute_gn_cnn(sd, p1, torch.randperm(12))
    x = torch.randn(16, 3, 8, 8)
    other = _gn_cnn().eval()
    other.load_state_dict(permuted)
    torch.testing.assert_close(other(x), net(x))
    spec = permutation_spec(_gn_cnn(), x)
    gn_group = next(g for g in spec.groups if any(m.tensor == "1.weight" for m in g.members))
    assert gn_group.blocks == 2 and not gn_group.zippable
    linear = next(m for g in spec.groups for m in g.members if m.tensor == "7.weight")
    assert linear.width == 16  # a channel of the 4×4 map is 16 consecutive inputs of the Linear
    _assert_recovers(sd, permuted, spec, _gn_cnn, [x])


def _permute_vit(sd, width, heads, blocks, g):
    """Residual stream, MLP units, whole heads and the dimensions inside each head, all shuffled."""
    d = width // heads
    r = torch.randperm(width, generator=g)
    out = dict(sd)
    for name in ("class_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias"):
        out[name] = sd[name][r]
    out["conv1.weight"] = sd["conv1.weight"][r]
    out["positional_embedding"] = sd["positional_embedding"][:, r]
    out["proj"] = sd["proj"][r]
    for i in range(blocks):
        b = f"transformer.resblocks.{i}."
        head_order = torch.randperm(heads, generator=g)
        qk = torch.cat([h * d + torch.randperm(d, generator=g) for h in head_order])
        vo = torch.cat([h * d + torch.randperm(d, generator=g) for h in head_order])
        w, bias = sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"]
        rows = torch.cat([qk, width + qk, 2 * width + vo])
        out[b + "attn.in_proj_weight"] = w[rows][:, r]
        out[b + "attn.in_proj_bias"] = bias[rows]
        out[b + "attn.out_proj.weight"] = sd[b + "attn.out_proj.weight"][r][:, vo]
        out[b + "attn.out_proj.bias"] = sd[b + "attn.out_proj.bias"][r]
        for ln in ("ln_1", "ln_2"):
            out[b + ln + ".weight"], out[b + ln + ".bias"] = sd[b + ln + ".weight"][r], sd[b + ln + ".bias"][r]
        hidden = torch.randperm(sd[b + "mlp.c_fc.bias"].numel(), generator=g)
        out[b + "mlp.c_fc.weight"] = sd[b + "mlp.c_fc.weight"][hidden][:, r]
        out[b + "mlp.c_fc.bias"] = sd[b + "mlp.c_fc.bias"][hidden]
        out[b + "mlp.c_proj.weight"] = sd[b + "mlp.c_proj.weight"][r][:, hidden]
        out[b + "mlp.c_proj.bias"] = sd[b + "mlp.c_proj.bias"][r]
    return out


def test_a_vit_tower_is_recovered_exactly_with_heads_and_dimensions_inside_heads_permuted():
    from evaluation.zoo.clip_model import CONFIG, create_vision_tower

    torch.manual_seed(2)
    tower = create_vision_tower().eval()
    sd = {k: v.clone() for k, v in tower.state_dict().items()}
    cfg = CONFIG["vision_cfg"]
    permuted = _permute_vit(sd, cfg["width"], cfg["width"] // cfg["head_width"], cfg["layers"],
                            torch.Generator().manual_seed(3))
    x = torch.randn(12, 3, 32, 32)
    other = create_vision_tower().eval()
    other.load_state_dict(permuted)
    torch.testing.assert_close(other(x), tower(x), rtol=1e-4, atol=1e-5)
    spec = permutation_spec(create_vision_tower())
    kinds = {g.name: (g.kind, g.zippable, g.parent) for g in spec.groups}
    assert kinds["residual"] == ("units", False, None) and kinds["b0.heads"] == ("heads", False, None)
    assert kinds["b0.qk"][2] == "b0.heads" and kinds["b0.mlp"] == ("units", True, None)
    _assert_recovers(sd, permuted, spec, create_vision_tower, [x],
                     settings=[(0.0, "align"), (0.5, "align"), (1.0, "align"), (0.5, "zip")])


# ---- BatchNorm, tracing, errors -------------------------------------------------------------------


def test_batchnorm_statistics_are_re_estimated_on_the_calibration_data():
    from merging.algorithms.mudsc import reset_batchnorm

    torch.manual_seed(4)
    net = _mlp()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randn(40, 10), torch.randn(24, 10)]
    reset = reset_batchnorm(_mlp, state, batches)
    pre = torch.cat([net[2](torch.relu(net[0](b))) for b in batches]).detach()  # what BatchNorm sees
    torch.testing.assert_close(reset["3.running_mean"], pre.mean(0))
    torch.testing.assert_close(reset["3.running_var"], pre.var(0, unbiased=True))
    assert torch.equal(reset["0.weight"], state["0.weight"])


def test_unsupported_graphs_are_refused_with_the_node_named():
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.cat([self.a(x), x], dim=1))

    with pytest.raises(MergeyardError, match="cat"):
        permutation_spec(Concat(), torch.randn(2, 4))
    with pytest.raises(MergeyardError, match="at least two"):
        mudsc([_mlp().state_dict()], permutation_spec(_mlp(), torch.randn(4, 10)), _mlp, [torch.randn(4, 10)])


def test_a_residual_stream_gets_one_permutation():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.f1, self.f2, self.out = nn.Linear(5, 8), nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.f2(torch.relu(self.f1(h)))
            return self.out(torch.relu(h))

    spec = permutation_spec(Residual(), torch.randn(3, 5))
    stream = next(g for g in spec.groups if any(m.tensor == "inp.weight" for m in g.members))
    assert {m.tensor for m in stream.members} >= {"inp.weight", "f2.weight", "f1.weight", "out.weight"}
    assert len(spec.groups) == 2


# ---- real merges ----------------------------------------------------------------------------------


def _train_digits_mlp(seed, x, y, hidden=96, steps=300):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (64,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_models_trained_from_different_seeds_merge_far_better_aligned_than_averaged():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = slice(0, 1200), slice(1200, None)
    nets = [_train_digits_mlp(seed, x[train], y[train]) for seed in (0, 1)]

    def accuracy(state):
        net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10))
        net.load_state_dict(state)
        return float((net(x[test]).argmax(1) == y[test]).float().mean())

    singles = [accuracy(n.state_dict()) for n in nets]
    states = [n.state_dict() for n in nets]
    create = lambda: nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10))  # noqa: E731
    spec = permutation_spec(create(), x[:8])
    averaged = accuracy({k: (states[0][k] + states[1][k]) / 2 for k in states[0]})
    calibration = [x[train][:256]]
    aligned = accuracy(mudsc(states, spec, create, calibration, MuDSCParams(alpha=0.5)).state)
    zipped = accuracy(mudsc(states, spec, create, calibration, MuDSCParams(alpha=0.5, mode="zip")).state)
    assert min(singles) > 0.9
    assert aligned > averaged + 0.1 and zipped > averaged + 0.1, (singles, averaged, aligned, zipped)
    assert aligned > min(singles) - 0.15


def test_a_mudsc_recipe_is_merged_recorded_with_its_matchings_and_reproduced(tmp_path):
    """Through the CLI: the zoo tower and a permuted, perturbed copy of it merge into the tower plus half the
    perturbation, and lineage records α, mode, the calibration digest and how far each model's units moved."""
    import json

    import yaml
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from evaluation.zoo.asset import load_asset
    from evaluation.zoo.clip_model import CONFIG
    from flows.cli import app

    clip, _ = load_asset()
    tower = {k: v.contiguous() for k, v in clip.visual.state_dict().items()}
    cfg = CONFIG["vision_cfg"]
    g = torch.Generator().manual_seed(5)
    noise = {k: 0.002 * torch.randn(v.shape, generator=g) for k, v in tower.items()}
    permuted = _permute_vit({k: v + noise[k] for k, v in tower.items()}, cfg["width"], cfg["width"] // cfg["head_width"],
                            cfg["layers"], g)
    save_file(tower, str(tmp_path / "a.safetensors"))
    save_file({k: v.contiguous() for k, v in permuted.items()}, str(tmp_path / "b.safetensors"))
    recipe = tmp_path / "mudsc.yaml"
    recipe.write_text(yaml.safe_dump({"method": "mudsc", "models": ["a.safetensors", "b.safetensors"],
                                      "parameters": {"alpha": 0.5, "calibration": {"suite": "zoo:digits", "samples": 16}}}))
    runner = CliRunner()
    merged = runner.invoke(app, ["merge", str(recipe), "--json", "--name", "aligned"])
    assert merged.exit_code == 0, merged.output
    digest = json.loads(merged.stdout)["digest"]
    from flows.registry_access import open_registry
    from merging.checkpoints.checkpoint import Checkpoint

    registry = open_registry()
    out = Checkpoint(registry.resolve(digest).store_path)
    for name, value in tower.items():
        torch.testing.assert_close(out.read(name), value + noise[name] / 2, rtol=0, atol=1e-6)
    graph = json.loads(runner.invoke(app, ["lineage", digest, "--format", "json"]).stdout)
    node = next(n for n in graph["nodes"] if n["digest"] == digest)
    run = registry.producing_run(registry.resolve(digest))
    decided = run.details["mudsc"]
    assert decided["alpha"] == 0.5 and decided["mode"] == "align" and decided["calibration_digest"].startswith("sha256:")
    assert decided["groups"]["residual"]["moved"][0] == 0 and decided["groups"]["residual"]["moved"][1] > 100
    edges = registry.parents_of(registry.resolve(digest))
    moved = {e.details["position"]: e.details["units_moved"]["b0.mlp"] for e, _ in edges if e.role == "candidate"}
    assert moved[0] == 0 and moved[1] > 400
    assert node["run_details"]["mudsc"]["calibration_digest"] == decided["calibration_digest"]
    tree = runner.invoke(app, ["lineage", digest]).stdout
    assert "α=0.5 align" in tree
    rebuilt = runner.invoke(app, ["reproduce", digest, "--json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(rebuilt.stdout[rebuilt.stdout.index("{"):])["ok"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "mudsc", "models": ["a.safetensors", "b.safetensors"],
                                   "parameters": {"alpha": 2, "mode": "shuffle"}}))
    refused = runner.invoke(app, ["merge", str(bad)])
    assert refused.exit_code == 1 and "alpha" in refused.stderr and "mode" in refused.stderr
