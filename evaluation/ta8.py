"""The real TA8 suite: CLIP ViT-B/32 on SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST and DTD.

Where the network is allowed, everything comes through huggingface_hub (and
its cache): the pre-trained `openai/clip-vit-base-patch32` (its text tower
builds the zero-shot heads from class names and templates; its frozen visual
projection maps the image tower's pooled output into the heads' space), the
datasets `tanganke/<task>` (parquet shards; class names from the dataset
card's features), and, as candidates, FusionBench's fine-tunes
`hf://tanganke/clip-vit-base-patch32_<task>` (transformers CLIPVisionModel
checkpoints, whose tensors are what mergeyard merges).

With the network off and the files not in the cache it fails at once, saying
which repository is missing. Images are decoded and preprocessed batch by
batch as the evaluator asks for them, never all at once.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from evaluation.families.zero_shot import ZeroShotImageFamily
from evaluation.suite import Suite, TaskData
from merging.errors import MergeyardError

BASE_REPO = "openai/clip-vit-base-patch32"
VERSION = "ta8-hf-v1"
# task → (dataset repo, fine-tune repo, prompt templates)
TA8 = {
    "sun397": ("tanganke/sun397", "tanganke/clip-vit-base-patch32_sun397", ["a photo of a {c}.", "a photo of the {c}."]),
    "stanford_cars": ("tanganke/stanford_cars", "tanganke/clip-vit-base-patch32_stanford-cars",
                      ["a photo of a {c}.", "a photo of a {c}, a type of car.", "a photo of my {c}."]),
    "resisc45": ("tanganke/resisc45", "tanganke/clip-vit-base-patch32_resisc45",
                 ["satellite imagery of {c}.", "aerial imagery of {c}.", "a satellite photo of the {c}."]),
    "eurosat": ("tanganke/eurosat", "tanganke/clip-vit-base-patch32_eurosat",
                ["a centered satellite photo of {c}.", "a satellite photo of {c}."]),
    "svhn": ("tanganke/svhn", "tanganke/clip-vit-base-patch32_svhn", ['a photo of the number: "{c}".']),
    "gtsrb": ("tanganke/gtsrb", "tanganke/clip-vit-base-patch32_gtsrb",
              ['a zoomed in photo of a "{c}" traffic sign.', 'a centered photo of a "{c}" traffic sign.']),
    "mnist": ("tanganke/mnist", "tanganke/clip-vit-base-patch32_mnist", ['a photo of the number: "{c}".']),
    "dtd": ("tanganke/dtd", "tanganke/clip-vit-base-patch32_dtd",
            ["a photo of a {c} texture.", "a photo of a {c} pattern.", "a photo of a {c} thing."]),
}
FEWSHOT_IMAGES = 100


def candidate_uris() -> dict[str, str]:
    """The FusionBench fine-tunes, as sources `mergeyard ingest` and pipelines take."""
    return {task: f"hf://{model}" for task, (_, model, _) in TA8.items()}


def _snapshot(repo: str, cache_dir: Path | None, repo_type: str = "model", patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type=repo_type, cache_dir=str(cache_dir) if cache_dir else None,
                                      allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise MergeyardError(f"the TA8 suite needs {repo_type} {repo!r}, which is not in the hub cache and cannot be "
                             "downloaded here (offline or HF_HUB_OFFLINE=1); fetch it where the network is allowed, "
                             "or use the offline miniature ta8-mini") from None
    except (HfHubHTTPError, OSError) as exc:
        raise MergeyardError(f"the TA8 suite could not fetch {repo_type} {repo!r}: {exc}") from None


class TA8Vision(torch.nn.Module):
    """The image tower the fine-tunes change, named as FusionBench's checkpoints name it (`vision_model.*`),
    followed by the pre-trained CLIP's frozen visual projection (a buffer, not part of the state dict)."""

    def __init__(self, config, projection: torch.Tensor):
        super().__init__()
        from transformers import CLIPVisionModel

        inner = CLIPVisionModel(config)
        # transformers 4 nests the transformer as `.vision_model`; 5 made CLIPVisionModel the transformer itself
        self.vision_model = getattr(inner, "vision_model", inner)
        self.register_buffer("projection", projection, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).pooler_output @ self.projection.T


@dataclass
class ParquetSplit:
    """One split of a hub dataset, decoded and preprocessed on demand: `images[a:b]` is a model-ready batch."""

    task: str
    name: str
    files: list[Path]
    revision: str
    processor: object
    limit: int | None = None
    spread: bool = False  # take `limit` rows evenly spaced through the split instead of the first ones

    @cached_property
    def _index(self) -> list[tuple[int, int, int]]:
        """(file, row group, row within it) for every row used."""
        import pyarrow.parquet as pq

        rows = []
        for f, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                rows += [(f, g, r) for r in range(meta.row_group(g).num_rows)]
        if self.spread and self.limit and len(rows) > self.limit:  # a few-shot budget from across the shard,
            rows = rows[::len(rows) // self.limit]                    # not its first (often class-sorted) rows
        return rows[:self.limit] if self.limit else rows

    @cached_property
    def labels(self) -> torch.Tensor:
        import pyarrow.parquet as pq

        columns = {}
        for f, path in enumerate(self.files):
            file = pq.ParquetFile(path)
            for g in range(file.metadata.num_row_groups):
                columns[(f, g)] = file.read_row_group(g, columns=["label"]).column("label").to_pylist()
        return torch.tensor([columns[(f, g)][r] for f, g, r in self._index], dtype=torch.long)

    @property
    def images(self) -> "ParquetSplit":
        return self

    def inputs(self, rows: slice) -> torch.Tensor:
        return self[rows]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        import pyarrow.parquet as pq
        from PIL import Image

        picked = self._index[rows]
        groups: dict[tuple[int, int], list] = {}
        for f, g, r in picked:
            groups.setdefault((f, g), []).append(r)
        decoded = {}
        for (f, g), wanted in groups.items():
            column = pq.ParquetFile(self.files[f]).read_row_group(g, columns=["image"]).column("image")
            for r in wanted:
                cell = column[r].as_py()
                data = cell["bytes"] if isinstance(cell, dict) else cell
                decoded[(f, g, r)] = Image.open(io.BytesIO(data)).convert("RGB")
        batch = [decoded[key] for key in picked]
        return self.processor(images=batch, return_tensors="pt")["pixel_values"]

    def digest(self) -> str:
        h = hashlib.sha256(f"{VERSION}/{self.task}/{self.name}/{self.revision}/{len(self)}/{self.spread}".encode())
        for path in self.files:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


def _class_names(card: Path) -> list[str]:
    """Class names from the dataset card's YAML header: dataset_info → features → label → class_label → names."""
    import yaml

    text = card.read_text() if card.is_file() else ""
    if not text.startswith("---"):
        raise MergeyardError(f"{card}: no dataset card with class names")
    header = yaml.safe_load(text.split("---", 2)[1]) or {}
    infos = header.get("dataset_info", {})
    for info in infos if isinstance(infos, list) else [infos]:
        for feature in info.get("features", []):
            if feature.get("name") == "label":
                names = feature["dtype"]["class_label"]["names"]
                return [names[k] for k in sorted(names, key=int)] if isinstance(names, dict) else list(names)
    raise MergeyardError(f"{card}: its features name no class_label `label`")


def _split_files(root: Path, split: str) -> list[Path]:
    files = sorted(p for p in root.rglob("*.parquet") if p.name.startswith(f"{split}-") or f"/{split}/" in str(p))
    return files


@torch.no_grad()
def _head(clip, tokenizer, classes: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot head: per class, the mean of its normalised template embeddings, normalised."""
    rows = []
    for c in classes:
        tokens = tokenizer([t.format(c=c) for t in templates], padding=True, return_tensors="pt")
        pooled = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        emb = torch.nn.functional.normalize(clip.text_projection(pooled), dim=-1).mean(0)
        rows.append(torch.nn.functional.normalize(emb, dim=0))
    return torch.stack(rows)


def load_ta8_suite(cache_dir: Path | None = None, tasks: list[str] | None = None,
                   max_test: int | None = None) -> Suite:
    """The TA8 suite from the hub (or its cache). `max_test` caps each test split (None: all of it)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    unknown = [t for t in tasks or [] if t not in TA8]
    if unknown:
        raise MergeyardError(f"suite 'ta8' has no task {unknown[0]!r}; its tasks: {', '.join(TA8)}")
    tasks = list(tasks or TA8)
    base = _snapshot(BASE_REPO, cache_dir, patterns=["*.json", "*.txt", "*.safetensors"])
    clip = CLIPModel.from_pretrained(base).eval()
    tokenizer = CLIPTokenizer.from_pretrained(base)
    processor = CLIPImageProcessor.from_pretrained(base)
    projection = clip.visual_projection.weight.detach().clone()
    data = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the heads' bytes enter the suite digest: the same in every process
    try:
        for task in tasks:
            dataset_repo, _, templates = TA8[task]
            root = _snapshot(dataset_repo, cache_dir, repo_type="dataset")
            classes = _class_names(root / "README.md")
            test_files = _split_files(root, "test")
            if not test_files:
                raise MergeyardError(f"{dataset_repo}: no test split (test-*.parquet) in the dataset")
            train_files = _split_files(root, "train")[:1] or test_files
            revision = root.name
            data[task] = TaskData(
                name=task, classes=tuple(classes), head=_head(clip, tokenizer, classes, templates),
                fewshot=ParquetSplit(task, "fewshot", train_files, revision, processor, FEWSHOT_IMAGES, spread=True),
                test=ParquetSplit(task, "test", test_files, revision, processor, max_test))
    finally:
        torch.set_num_threads(threads)
    config = clip.config.vision_config
    family = ZeroShotImageFamily(lambda: TA8Vision(config, projection).eval(), lambda x: x,
                                 float(clip.logit_scale.detach().exp()), label=BASE_REPO)  # 100 for OpenAI's ViT-B/32
    return Suite("ta8", data, family, {}, VERSION)
