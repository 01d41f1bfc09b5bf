"""image-classification from a suite file: an image folder and a transformers ViT with one linear head per task,
checked against transformers run directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml


@pytest.fixture
def tiny_vit(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = dict(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32)
    base_dir = tmp_path / "vit-base"
    base = ViTModel(ViTConfig(**config), add_pooling_layer=False)  # the encoder as ViTForImageClassification holds it
    base.save_pretrained(base_dir)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(base_dir)
    classes = ["dark", "light"]
    ft_dir = tmp_path / "vit-ft"
    ft = ViTForImageClassification(ViTConfig(**config, num_labels=2, id2label=dict(enumerate(classes)),
                                             label2id={c: i for i, c in enumerate(classes)}))
    ft.vit.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
    ft.save_pretrained(ft_dir)
    rng = np.random.default_rng(0)
    for c, level in zip(classes, (40, 210)):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(level + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / c / f"{i}.png")
    suite = tmp_path / "images.yaml"
    suite.write_text(yaml.safe_dump({"name": "brightness", "family": "image-classification", "model": "vit-base",
                                     "tasks": [{"name": "brightness", "eval": "photos", "head": "vit-ft"}]}))
    return {"base": base_dir, "ft": ft_dir, "suite": suite, "photos": tmp_path / "photos"}


def test_an_image_folder_suite_scores_a_vit_as_transformers_does(tiny_vit, cli):
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    report = json.loads(cli("evaluate", tiny_vit["ft"], "--suite", tiny_vit["suite"], "--json").stdout)
    model = ViTForImageClassification.from_pretrained(tiny_vit["ft"]).eval()
    processor = ViTImageProcessor.from_pretrained(tiny_vit["base"])
    paths = sorted(tiny_vit["photos"].glob("*/*.png"))
    with torch.no_grad():
        logits = model(**processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")).logits
    labels = torch.tensor([["dark", "light"].index(p.parent.name) for p in paths])
    task = report["tasks"][0]
    assert task["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert task["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
