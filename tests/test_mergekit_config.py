"""mergekit's YAML as it is: its own example configs run unchanged on Llama-shaped stand-ins, each means the same
canonical recipe (and digest) as the mergeyard recipe written by hand, and every key mergeyard cannot honour is a
one-line error naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_all
from merging.engine import run_merge
from merging.errors import RecipeError
from merging.recipes.recipe import load_recipe, parse_recipe

EXAMPLES = Path(__file__).parent / "data" / "mergekit_examples"
STAND_INS = ["orca-mini", "platypus", "wizardlm", "wizardmath", "llama-2", "mistral-base", "mistral-instruct",
             "biomistral"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Llama-shaped models of 40 layers (the examples' 13B layer count) at a tiny width, one per example model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("stand-ins")
    config = LlamaConfig(vocab_size=48, hidden_size=8, intermediate_size=16, num_hidden_layers=40,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    for i, name in enumerate(STAND_INS):
        model = LlamaForCausalLM(config)
        g = torch.Generator().manual_seed(i + 1)
        model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        model.save_pretrained(root / name)
    return root


def example(stand_ins, name, tmp_path):
    shutil.copy(EXAMPLES / f"{name}.yml", stand_ins / f"{name}.yml")
    return stand_ins / f"{name}.yml"


HAND_WRITTEN = {
    "ties": lambda d: {
        "method": "ties", "base": str(d / "llama-2"), "out_dtype": "float16",
        "parameters": {"trim_scope": "per_tensor", "aggregate": "mean", "density": 1.0},
        "models": [{"model": str(d / "orca-mini"), "weight": 1.0, "parameters": {"density": [1, 0.7, 0.1]}},
                   {"model": str(d / "platypus"), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                   {"model": str(d / "wizardmath"),
                    "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}}]},
    "bio-merge": lambda d: {
        "method": "ties", "base": str(d / "mistral-base"), "out_dtype": "float16",
        "parameters": {"trim_scope": "per_tensor", "aggregate": "sum", "density": 1.0},
        "models": [{"model": str(d / "mistral-instruct"), "weight": 0.5, "parameters": {"density": 0.5}},
                   {"model": str(d / "biomistral"), "weight": 0.5, "parameters": {"density": 0.5}}]},
    "gradient-slerp": lambda d: {
        "method": "slerp", "base": str(d / "orca-mini"), "models": [str(d / "platypus")], "out_dtype": "float16",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "linear": lambda d: {
        "method": "average", "parameters": {"normalize": True}, "out_dtype": "float16",
        "models": [{"model": str(d / "orca-mini"), "weight": 1.0}, {"model": str(d / "wizardlm"), "weight": 0.3},
                   {"model": str(d / "platypus"), "weight": 0.5}]},
    "orcamini-platy-44layer": lambda d: {
        "method": "passthrough", "out_dtype": "float16",
        "slices": [{"model": str(d / "orca-mini"), "layer_range": [0, 24]},
                   {"model": str(d / "platypus"), "layer_range": [20, 40]}]},
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_mergekit_example_runs_unchanged_and_means_the_hand_written_recipe(stand_ins, tmp_path, name):
    from transformers import AutoModelForCausalLM

    converted = load_recipe(example(stand_ins, name, tmp_path))
    by_hand = parse_recipe(HAND_WRITTEN[name](stand_ins))
    assert converted.canonical() == by_hand.canonical()
    assert converted.recipe_hash == by_hand.recipe_hash
    a = run_merge(converted, tmp_path / "from-mergekit-yaml")
    b = run_merge(by_hand, tmp_path / "from-mergeyard-yaml")
    assert a.digest == b.digest
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from-mergekit-yaml")
    assert model.config.num_hidden_layers == (44 if name == "orcamini-platy-44layer" else 40)


def test_frankenmerge_stacks_the_slices_layers_renumbered(stand_ins, tmp_path):
    recipe = load_recipe(example(stand_ins, "orcamini-platy-44layer", tmp_path))
    run_merge(recipe, tmp_path / "out")
    got = load_all(tmp_path / "out")
    orca, platy = load_all(stand_ins / "orca-mini"), load_all(stand_ins / "platypus")
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(got[name.format(0)], orca[name.format(0)].half())
    assert torch.equal(got[name.format(23)], orca[name.format(23)].half())
    assert torch.equal(got[name.format(24)], platy[name.format(20)].half())  # the second slice starts at its 20th
    assert torch.equal(got[name.format(43)], platy[name.format(39)].half())
    assert name.format(44) not in got
    assert torch.equal(got["model.embed_tokens.weight"], orca["model.embed_tokens.weight"].half())  # first slice's
    assert torch.equal(got["lm_head.weight"], platy["lm_head.weight"].half())  # the last slice's
    assert torch.equal(got["model.norm.weight"], platy["model.norm.weight"].half())


def test_mergekit_yaml_merges_through_the_cli_and_registers(cli, stand_ins, tmp_path):
    result = cli("merge", str(example(stand_ins, "gradient-slerp", tmp_path)), "--json")
    assert result.exit_code == 0, result.output
    assert cli("recipe", "convert", str(stand_ins / "gradient-slerp.yml")).exit_code == 0


def test_recipe_convert_prints_the_mergeyard_recipe(cli, stand_ins, tmp_path):
    result = cli("recipe", "convert", str(example(stand_ins, "ties", tmp_path)))
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed == parse_recipe(HAND_WRITTEN["ties"](stand_ins)).canonical()
    assert parse_recipe(printed).recipe_hash in result.output


BASE = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}


@pytest.mark.parametrize("change,message", [
    ({"modules": {}}, "`modules:`"),
    ({"tokenizer": {"source": "union"}}, "`tokenizer:`"),
    ({"chat_template": "chatml"}, "`chat_template:`"),
    ({"merge_stuff": 1}, "unknown keys merge_stuff"),
    ({"merge_method": "arcee_fusion"}, "'arcee_fusion' is not available"),
    ({"merge_method": "ram"}, "'ram' is not available"),
    ({"tokenizer_source": "union"}, "merged vocabulary"),
    ({"parameters": {"rescale": True}}, "rescale"),
    ({"parameters": {"frobnicate": 1}}, "frobnicate"),
    ({"merge_method": "task_arithmetic", "parameters": {"normalize": True}}, "normalize"),
    ({"merge_method": "dare_linear", "parameters": {"normalize": True}}, "normalize"),
    ({"models": [{"model": "a", "parameters": {"gamma": 0.1}}]}, "no per-model gamma"),
    ({"models": [{"model": "a", "revision": "main"}]}, "revision"),
    ({"models": [{"model": "a+adapter"}]}, "LoRA"),
    ({"merge_method": "slerp", "models": [{"model": "a", "parameters": {"weight": 0.5}}], "parameters": {"t": 0.5}},
     "no per-model weight"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}], "models": None}, "cannot check layer_range"),
    ({"slices": [{"sources": []}, {"sources": []}], "models": None}, "frankenmerge"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.1}], "models": None},
     "residual_weight"),
    ({"merge_method": "passthrough", "base_model": None, "models": [{"model": "a", "parameters": {"scale": 2.0}}]},
     "per-model parameters"),
    ({"merge_method": "passthrough", "base_model": None, "models": None,
      "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]},
     "one source per slice"),
    ({"models": None}, "exactly one of"),
])
def test_keys_mergeyard_cannot_honour_are_one_line_errors(change, message):
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(data)
    assert "\n" not in str(info.value)


def test_partial_layer_range_in_a_merge_slice_is_refused(stand_ins):
    data = {"merge_method": "slerp", "base_model": str(stand_ins / "orca-mini"), "parameters": {"t": 0.5},
            "slices": [{"sources": [{"model": str(stand_ins / "orca-mini"), "layer_range": [0, 20]},
                                    {"model": str(stand_ins / "platypus"), "layer_range": [0, 20]}]}]}
    with pytest.raises(RecipeError, match=r"is not every layer .*\[0, 40\]"):
        parse_recipe(data)


def test_dare_density_is_the_complement_of_its_drop_rate():
    data = {"merge_method": "dare_ties", "base_model": "b", "parameters": {"density": [0.2, 0.6]},
            "models": [{"model": "a", "parameters": {"density": 0.3, "weight": 0.5}}]}
    recipe = parse_recipe(data)
    canonical = recipe.canonical()
    assert canonical["parameters"]["drop_rate"] == pytest.approx([0.8, 0.4])
    assert canonical["models"][0]["parameters"] == {"drop_rate": pytest.approx(0.7)}
    assert canonical["models"][0]["weight"] == 0.5
