"""LoRA adapters as merge candidates and `mergeyard extract-lora`, checked against peft itself.

The adapters are built by peft on a tiny Llama-shaped model; the reference for an adapter's merge is the same
merge of peft's own `merge_and_unload()` weights, and the reference for extraction is the SVD's error bound
computed here from singular values (torch.linalg.svdvals, float64), not from mergeyard's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_all

peft = pytest.importorskip("peft", reason="peft is a dependency of mergeyard; install the project")

LAYERS = 2


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base, a full fine-tune, a peft LoRA adapter (r=4, alpha=8, rsLoRA off) and peft's merge_and_unload of it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    full = tiny_llama()
    full.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
    full.save_pretrained(root / "full")
    adapted = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      lora_dropout=0.0))
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); a trained one is not
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    adapted.save_pretrained(root / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(), root / "adapter")  # what a user has: the saved adapter
    reloaded.merge_and_unload().save_pretrained(root / "unloaded")
    return root


def recipe(path: Path, models: list[Path], base: Path, method: str = "task_arithmetic", **params) -> Path:
    path.write_text(yaml.safe_dump({"method": method, "base": str(base), "models": [str(m) for m in models],
                                    "parameters": params}))
    return path


def test_an_adapter_merges_as_its_merged_and_unloaded_weights(cli, isolated_home, family, tmp_path):
    cli("ingest", family / "base", "--name", "base")
    ingested = json.loads(cli("ingest", family / "adapter", "--base", "base", "--name", "lora", "--json").stdout)
    assert ingested["architecture"] == "peft-lora"
    for method, params in (("task_arithmetic", {"lambda": 0.7}), ("ties", {"density": 0.5, "trim_scope": "per_tensor"})):
        with_adapter = json.loads(cli("merge", recipe(tmp_path / f"{method}-a.yaml", [family / "adapter", family / "full"],
                                                      family / "base", method, **params), "--json").stdout)
        with_weights = json.loads(cli("merge", recipe(tmp_path / f"{method}-b.yaml", [family / "unloaded", family / "full"],
                                                      family / "base", method, **params), "--json").stdout)
        a, b = load_all(with_adapter["store_path"]), load_all(with_weights["store_path"])
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, method
    # and in closed form: base + λ (scaling·B@A + (full − base)) on an adapted weight, from peft's saved tensors
    from safetensors.torch import load_file

    saved = load_file(family / "adapter" / "adapter_model.safetensors")
    base_sd, full_sd = load_all(family / "base"), load_all(family / "full")
    out = load_all(json.loads(cli("merge", recipe(tmp_path / "ta.yaml", [family / "adapter", family / "full"],
                                                  family / "base", **{"lambda": 0.7}), "--json").stdout)["store_path"])
    w = "model.layers.1.self_attn.v_proj.weight"
    stem = "base_model.model.model.layers.1.self_attn.v_proj"
    delta = saved[stem + ".lora_B.weight"] @ saved[stem + ".lora_A.weight"] * (8 / 4)
    expected = base_sd[w] + 0.7 * (delta + full_sd[w] - base_sd[w])
    assert torch.allclose(out[w], expected, atol=1e-6)
    untouched = "model.layers.0.mlp.up_proj.weight"  # not a target: only the full fine-tune moves it
    assert torch.allclose(out[untouched], base_sd[untouched] + 0.7 * (full_sd[untouched] - base_sd[untouched]), atol=1e-6)


def test_an_adapter_named_in_a_recipe_is_ingested_on_the_recipes_base(cli, isolated_home, family, tmp_path):
    merged = json.loads(cli("merge", recipe(tmp_path / "r.yaml", [family / "adapter"], family / "base", **{"lambda": 1.0}),
                            "--json").stdout)
    unloaded = load_all(family / "unloaded")
    out = load_all(merged["store_path"])
    assert max(float((out[k] - unloaded[k]).abs().max()) for k in out) <= 1e-6
    models = {m["name"]: m for m in json.loads(cli("models", "list", "--json").stdout)}
    assert models["adapter"]["architecture"] == "peft-lora"


def test_adapters_are_refused_without_their_base_or_on_another(cli, isolated_home, family, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    no_base = cli("ingest", family / "adapter", ok=False)
    assert no_base.exit_code == 1 and "give the base" in no_base.output
    assert len(no_base.output.strip().splitlines()) == 1
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))
    wider.save_pretrained(tmp_path / "wider")
    wrong = cli("ingest", family / "adapter", "--base", tmp_path / "wider", ok=False)
    assert wrong.exit_code == 1 and "is this the adapter's base?" in wrong.output
    names = {m["name"] for m in json.loads(cli("models", "list", "--json").stdout)}
    assert "adapter" not in names  # no registry entry for the adapter that failed validation
    # registered on one base, merged on another of the same shapes: refused, not silently re-based
    cli("ingest", family / "base", "--name", "base")
    cli("ingest", family / "adapter", "--base", "base", "--name", "lora")
    other = cli("merge", recipe(tmp_path / "o.yaml", ["lora"], family / "full"), ok=False)
    assert other.exit_code == 1 and "merge it on the base it was trained on" in other.output
    alone = cli("evaluate", "lora", "--suite", "ta8-mini", ok=False)  # its weights exist only merged onto a base
    assert alone.exit_code == 1 and "cannot be evaluated on its own" in alone.output


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "only LoRA adapters"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
])
def test_adapters_mergeyard_cannot_merge_are_refused_in_one_line(cli, isolated_home, family, tmp_path, change, message):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(family / "adapter", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
    result = cli("ingest", bad, "--base", family / "base", ok=False)
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_the_engine_refuses_a_raw_adapter_directory_with_what_to_do(family, tmp_path):
    from merging.engine import run_merge
    from merging.errors import CheckpointError
    from merging.recipes.recipe import parse_recipe

    r = parse_recipe({"method": "task_arithmetic", "base": str(family / "base"), "models": [str(family / "adapter")]})
    with pytest.raises(CheckpointError, match="mergeyard ingest"):
        run_merge(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_lora_reproduces_the_model_within_the_svd_error_when_loaded_by_peft(cli, family, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    rank = 3
    out = tmp_path / "extracted"
    report = json.loads(cli("extract-lora", family / "full", "--base", family / "base", "--rank", rank, "--out", out,
                            "--json").stdout)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family / "base"), out).merge_and_unload()
    rebuilt = {k: v.detach() for k, v in loaded.state_dict().items()}
    base_sd, full_sd = load_all(family / "base"), load_all(family / "full")
    adapted = 0
    for name, w in full_sd.items():
        delta = (w - base_sd[name]).double()
        if delta.ndim != 2 or "embed" in name:
            # not a linear weight: the adapter leaves the base's, and the report says it differs
            assert torch.equal(rebuilt[name], base_sd[name]) and name in report["left_out"]
            continue
        s = torch.linalg.svdvals(delta)
        bound = float(s[rank:].pow(2).sum().sqrt())  # Eckart–Young: the best rank-r error in Frobenius norm
        error = float(torch.linalg.matrix_norm(rebuilt[name].double() - w.double()))
        assert error <= bound * (1 + 1e-4) + 1e-5, name
        assert error >= bound * (1 - 1e-3), name  # and it is the SVD's, not a lucky smaller one
        adapted += 1
    assert adapted == LAYERS * 7 + 1  # q k v o gate up down per layer, and lm_head
    assert len(report["modules"]) == adapted


def test_extract_lora_of_a_low_rank_change_is_exact(cli, family, tmp_path):
    """A model that differs from its base by a rank-2 change per weight comes back whole from a rank-2 adapter."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    base_sd = load_all(family / "base")
    g = torch.Generator().manual_seed(5)
    changed = {k: (v + torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g) * 0.01
                   if v.ndim == 2 and "embed" not in k else v.clone()) for k, v in base_sd.items()}
    (tmp_path / "low").mkdir()
    save_file(changed, str(tmp_path / "low" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "low" / "config.json").write_text((family / "base" / "config.json").read_text())
    cli("extract-lora", tmp_path / "low", "--base", family / "base", "--rank", 2, "--out", tmp_path / "a")
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family / "base"), tmp_path / "a")
    rebuilt = loaded.merge_and_unload().state_dict()
    assert max(float((rebuilt[k] - changed[k]).abs().max()) for k in changed) <= 1e-6
    again = cli("extract-lora", tmp_path / "low", "--base", family / "base", "--rank", 2, "--out", tmp_path / "a", ok=False)
    assert again.exit_code == 1 and "--overwrite" in again.output
    zero = cli("extract-lora", tmp_path / "low", "--base", family / "base", "--rank", 0, "--out", tmp_path / "z", ok=False)
    assert zero.exit_code == 1 and not (tmp_path / "z").exists()


def test_an_adapter_from_the_hub_cache_is_ingested_offline(registry, family):
    from test_registry import write_hub_cache

    from merging.checkpoints.checkpoint import Checkpoint
    from merging.checkpoints.lora import is_adapter, targets

    base, _ = registry.ingest(str(family / "base"), name="base")
    files = {p.name: p.read_bytes() for p in (family / "adapter").iterdir() if p.is_file()}
    commit = write_hub_cache(registry.config.hf_cache, "acme/tiny-lora", files)
    model, created = registry.ingest("hf://acme/tiny-lora", base=base.digest)
    assert created and model.source_uri == f"hf://acme/tiny-lora@{commit}" and model.base_model_id == base.id
    stored = Checkpoint(model.store_path)
    assert is_adapter(stored) and len(targets(stored)) == LAYERS * 3
    # the same adapter from its directory is the same bytes: the same registry row
    assert registry.ingest(str(family / "adapter"), base=base.digest)[0].id == model.id


def test_a_fan_in_fan_out_adapter_of_gpt2_merges_as_peft_merges_it(cli, isolated_home, tmp_path):
    """GPT-2's Conv1D stores weights transposed (fan_in_fan_out): the task vector is (B@A)ᵀ."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    adapted = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                             LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                        use_rslora=True))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    adapted.save_pretrained(tmp_path / "adapter")
    unloaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    expected = {k: v.detach() for k, v in unloaded.merge_and_unload().state_dict().items()}
    merged = json.loads(cli("merge", recipe(tmp_path / "r.yaml", [tmp_path / "adapter"], tmp_path / "base",
                                            **{"lambda": 1.0}), "--json").stdout)
    out = load_all(merged["store_path"])
    moved = [k for k in out if "c_attn.weight" in k or "c_fc.weight" in k]
    assert len(moved) == 4 and all(not torch.equal(out[k], load_all(tmp_path / "base")[k]) for k in moved)
    assert max(float((out[k] - expected[k]).abs().max()) for k in out if k in expected) <= 1e-6


def test_the_randomized_svd_for_large_weights_is_near_the_best_rank_r_and_reports_its_own_error(family, tmp_path):
    """Forced onto every weight (`exact_up_to=0`): within 5% of the Eckart–Young bound, never below it, the
    reported error the one measured from the weights peft rebuilds, and the same adapter twice."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from merging.checkpoints.checkpoint import Checkpoint
    from merging.algorithms.extract_lora import extract_lora

    rank = 3
    report = extract_lora(Checkpoint(family / "full"), Checkpoint(family / "base"), rank, tmp_path / "r", exact_up_to=0)
    again = extract_lora(Checkpoint(family / "full"), Checkpoint(family / "base"), rank, tmp_path / "r2", exact_up_to=0)
    assert load_file(tmp_path / "r" / "adapter_model.safetensors").keys() == load_file(
        tmp_path / "r2" / "adapter_model.safetensors").keys()
    assert all(torch.equal(x, y) for x, y in zip(load_file(tmp_path / "r" / "adapter_model.safetensors").values(),
                                                 load_file(tmp_path / "r2" / "adapter_model.safetensors").values()))
    assert report.modules == again.modules
    rebuilt = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family / "base"), tmp_path / "r").merge_and_unload()
    rebuilt = {k: v.detach() for k, v in rebuilt.state_dict().items()}
    base_sd, full_sd = load_all(family / "base"), load_all(family / "full")
    for module, row in report.modules.items():
        name = module + ".weight"
        delta = (full_sd[name] - base_sd[name]).double()
        bound = float(torch.linalg.svdvals(delta)[rank:].pow(2).sum().sqrt())
        error = float(torch.linalg.matrix_norm(rebuilt[name].double() - full_sd[name].double()))
        assert bound * (1 - 1e-3) <= error <= bound * 1.05, name
        assert abs(row["error"] - error) <= 1e-3 * bound, name
