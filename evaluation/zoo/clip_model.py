"""The zoo's small CLIP: open_clip's CLIP class with a custom config and a word-level tokenizer.

A BPE tokenizer would need a 49,408-row embedding (6M parameters at width
128); every caption and prompt here is drawn from a vocabulary of a few
hundred words, so the text tower gets exactly those. open_clip pools the text
at the position of the largest token id, so end-of-text gets the largest id.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache

import torch

from evaluation.zoo.tasks import TASKS

CONTEXT = 16
CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": CONTEXT, "width": 128, "heads": 4, "layers": 3, "mlp_ratio": 4.0},
}
MEAN = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1)
STD = torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    words = set()
    for task in TASKS.values():
        for c in task.classes:
            words.update(_words(task.caption.format(c=c)))
            words.update(_words(task.prompt.format(c=c)))
    return ("<pad>", "<unk>", "<sot>", *sorted(words), "<eot>")


def vocab_digest() -> str:
    return hashlib.sha256(json.dumps(vocabulary()).encode()).hexdigest()


def tokenize(texts: list[str]) -> torch.Tensor:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    out = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [vocab["<sot>"]] + [vocab.get(w, vocab["<unk>"]) for w in _words(text)][: CONTEXT - 2] + [vocab["<eot>"]]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def create_clip() -> torch.nn.Module:
    import open_clip

    cfg = json.loads(json.dumps(CONFIG))
    cfg["text_cfg"]["vocab_size"] = len(vocabulary())
    return open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])


def create_vision_tower() -> torch.nn.Module:
    """The image tower alone: what fine-tunes change and merges combine."""
    return create_clip().visual


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """N×32×32×3 uint8 (or float in 0..255) → normalised N×3×32×32 float."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN.to(x.device)) / STD.to(x.device)


@torch.no_grad()
def zero_shot_head(clip: torch.nn.Module, task_name: str) -> torch.Tensor:
    """Normalised text embeddings of the task's prompts: a frozen classification head (classes × embed)."""
    task = TASKS[task_name]
    tokens = tokenize([task.prompt.format(c=c) for c in task.classes])
    clip.eval()
    # The head's bytes enter the suite digest, and a matmul's float rounding depends on how many threads
    # split it (Dask workers run with one): compute it single-threaded so every process agrees.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            emb = clip.encode_text(tokens)
    finally:
        torch.set_num_threads(threads)
    return torch.nn.functional.normalize(emb, dim=-1)


def logit_scale(clip: torch.nn.Module) -> float:
    """The CLIP's learned temperature as pre-training used it (capped at 100, as CLIP's is): the scale its
    zero-shot logits and its fine-tunes use. Pre-training the zoo's CLIP settles near 27; a fixed 100, 3.6 times
    sharper, made fine-tunes pull every image's features, other tasks' too, towards one point
    (bench/zoo_capacity.py --scale measures both)."""
    return float(clip.logit_scale.detach().exp().clamp(max=100))


def logits(visual: torch.nn.Module, head: torch.Tensor, images: torch.Tensor, scale: float) -> torch.Tensor:
    features = torch.nn.functional.normalize(visual(images), dim=-1)
    return scale * features @ head.T
