"""The real TA8 adapter, offline: a tiny CLIP, a tiny fine-tune and a tiny MNIST written into a hand-built hub cache.

The same code paths as on a networked machine (huggingface_hub's snapshot_download, transformers'
CLIPModel / CLIPTokenizer / CLIPImageProcessor, parquet shards with a dataset card), checked against a
zero-shot evaluation written here directly with transformers.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import torch

COMMIT = "b" * 40


def _snapshot(cache, kind, repo):
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    shifted, extra = [], 0
    for b in range(256):
        if b in keep:
            shifted.append(chr(b))
        else:
            shifted.append(chr(256 + extra))
            extra += 1
    return shifted


def _tiny_tokenizer(directory):
    """A character-level CLIP BPE: every byte-level symbol, alone and word-final, and no merges."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    return len(vocab)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from PIL import Image
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cache = tmp_path_factory.mktemp("hub")
    base = _snapshot(cache, "models", "openai/clip-vit-base-patch32")
    vocab_size = _tiny_tokenizer(base)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": vocab_size - 2,
                     "eos_token_id": vocab_size - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(base)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(base)
    # a "fine-tune": the vision tower with its weights nudged, laid out as FusionBench publishes them
    # (a CLIPVisionModel checkpoint: config.json + model.safetensors with `vision_model.*` tensors)
    tuned = _snapshot(cache, "models", "tanganke/clip-vit-base-patch32_mnist")
    g = torch.Generator().manual_seed(2)
    save_file({f"vision_model.{k}": (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous()
               for k, v in clip.vision_model.state_dict().items()}, str(tuned / "model.safetensors"))
    (tuned / "config.json").write_text(json.dumps({**config.vision_config.to_dict(), "architectures": ["CLIPVisionModel"]}))
    # MNIST: a dataset card with the class names, and parquet shards of PNG-encoded images
    data = _snapshot(cache, "datasets", "tanganke/mnist")
    names = {str(i): str(i) for i in range(10)}
    (data / "README.md").write_text("---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: label\n"
                                    "    dtype:\n      class_label:\n        names:\n" +
                                    "".join(f"          '{k}': '{v}'\n" for k, v in names.items()) + "---\n# mnist\n")
    (data / "data").mkdir()
    g = torch.Generator().manual_seed(1)
    for split, n in (("test", 30), ("train", 40)):
        rows = []
        for i in range(n):
            pixels = (torch.rand(28, 28, generator=g) * 255).to(torch.uint8).numpy()
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            rows.append({"image": {"bytes": buf.getvalue(), "path": None}, "label": i % 10})
        pq.write_table(pa.Table.from_pylist(rows), data / "data" / f"{split}-00000-of-00001.parquet", row_group_size=8)
    return cache, clip


def test_the_ta8_suite_loads_offline_from_the_hub_cache_and_scores_like_transformers_directly(hub, monkeypatch):
    from PIL import Image
    import pyarrow.parquet as pq
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from evaluation.evaluator import evaluate_state
    from evaluation.ta8 import TA8, load_ta8_suite

    cache, clip = hub
    suite = load_ta8_suite(cache, ["mnist"])
    task = suite.tasks["mnist"]
    assert task.classes == tuple(str(i) for i in range(10)) and task.head.shape == (10, 16)
    assert len(task.test.labels) == 30 and len(task.fewshot.labels) == 40  # the budget is 100: all 40 train rows
    state = {k: v for k, v in clip.vision_model.state_dict().items()}
    state = {f"vision_model.{k}": v for k, v in state.items()}
    result = evaluate_state(state, suite)

    # independently: transformers' CLIP, the processor on the PNG bytes, the templates' text embeddings
    base = cache / "models--openai--clip-vit-base-patch32" / "snapshots" / COMMIT
    tok, proc = CLIPTokenizer.from_pretrained(base), CLIPImageProcessor.from_pretrained(base)
    table = pq.read_table(cache / "datasets--tanganke--mnist" / "snapshots" / COMMIT / "data" / "test-00000-of-00001.parquet")
    images = [Image.open(io.BytesIO(c["bytes"])).convert("RGB") for c in table.column("image").to_pylist()]
    labels = torch.tensor(table.column("label").to_pylist())
    with torch.no_grad():
        heads = []
        for c in task.classes:
            t = tok([tpl.format(c=c) for tpl in TA8["mnist"][2]], padding=True, return_tensors="pt")
            e = clip.text_projection(clip.text_model(**t).pooler_output)
            heads.append(torch.nn.functional.normalize(torch.nn.functional.normalize(e, dim=-1).mean(0), dim=0))
        pixels = proc(images=images, return_tensors="pt")["pixel_values"]
        feats = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        logits = torch.nn.functional.normalize(feats, dim=-1) @ torch.stack(heads).T
    assert result.tasks[0].accuracy == int((logits.argmax(-1) == labels).sum()) / len(labels)
    # the loss checks every logit, not only the arg max, at the model's own logit scale (TA8's heads carry it;
    # this tiny CLIP's is transformers' initial e^2.6592 = 14.3, OpenAI's 100)
    scale = float(clip.logit_scale.exp())
    assert suite.family.logit_scale == pytest.approx(scale) and scale < 20
    assert result.tasks[0].loss == pytest.approx(float(torch.nn.functional.cross_entropy(scale * logits, labels)), rel=1e-4)


def test_a_fusionbench_fine_tune_is_ingested_by_hf_uri_and_evaluated_on_ta8(hub, registry):
    import dataclasses

    from evaluation.evaluator import evaluate_checkpoint
    from evaluation.ta8 import candidate_uris, load_ta8_suite
    from registry.registry import Registry

    cache, _ = hub
    registry = Registry(dataclasses.replace(registry.config, hf_cache=cache))
    model, created = registry.ingest(candidate_uris()["mnist"])
    assert created and model.source_uri == f"hf://tanganke/clip-vit-base-patch32_mnist@{COMMIT}"
    result = evaluate_checkpoint(model.store_path, load_ta8_suite(cache, ["mnist"]))
    assert 0.0 <= result.tasks[0].accuracy <= 1.0 and result.tasks[0].samples == 30
    registry.close()


def test_without_the_network_a_missing_repository_fails_at_once_with_its_name(hub, monkeypatch):
    from evaluation.ta8 import load_ta8_suite
    from merging.errors import MergeyardError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache, _ = hub
    started = time.perf_counter()
    with pytest.raises(MergeyardError, match="dataset 'tanganke/dtd'.*not in the hub cache.*ta8-mini"):
        load_ta8_suite(cache, ["mnist", "dtd"])
    assert time.perf_counter() - started < 10
    with pytest.raises(MergeyardError, match="no task 'imagenet'"):
        load_ta8_suite(cache, ["imagenet"])


def test_the_cli_evaluates_on_ta8_from_the_cache_the_settings_name(hub, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    cache, _ = hub
    monkeypatch.setenv("MERGEYARD_HF_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from evaluation.suites import load_suite
    from flows.settings import get_settings

    get_settings.cache_clear()
    load_suite.cache_clear()
    out = CliRunner().invoke(app, ["evaluate", "hf://tanganke/clip-vit-base-patch32_mnist", "--suite", "ta8",
                                   "--tasks", "mnist", "--json", "--no-record"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["tasks"][0]["task"] == "mnist"
    load_suite.cache_clear()


def test_ta8_tasks_are_checked_without_reaching_the_hub():
    from evaluation.suites import check_tasks
    from evaluation.ta8 import TA8, load_ta8_suite
    from merging.errors import MergeyardError

    assert check_tasks("ta8", None) == tuple(TA8) and check_tasks("ta8", ["mnist", "dtd"]) == ("mnist", "dtd")
    with pytest.raises(MergeyardError, match="suite 'ta8' has no task 'cifar10'; its tasks: sun397, stanford_cars"):
        check_tasks("ta8", ["mnist", "cifar10"])
    with pytest.raises(MergeyardError, match="suite 'ta8' has no task 'cifar10'"):  # loading checks the same way
        load_ta8_suite(None, ["mnist", "cifar10"])
