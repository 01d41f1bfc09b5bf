"""Registered models as MLflow pyfunc models: `mlflow.pyfunc.load_model("models:/NAME@staging")` and
`mlflow models serve` predict on a pandas DataFrame.

A registered version's artifacts are an MLflow model whose flavour is this
module (`loader_module`, no pickle): its data directory holds the checkpoint
(safetensors, config, tokenizer), the heads of the tasks it serves, and
`serving.json` saying what it is:

    text-classification   an encoder and one head per task (a merge of sequence-classification fine-tunes, or
                          one fine-tune): a text column in, one label column per task out (`params: {task: X}` for one)
    image-classification  the same with an image-path column, through the model's image processor
    causal-lm             a prompt column in, the generated continuation out (`params: {max_new_tokens: N}`)
    features              any other transformers model: the mean of its last hidden states per text

Checkpoints transformers cannot build (the zoo's open_clip towers) are registered
without a pyfunc flavour, as before.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC = "serving.json"
MODEL_DIR = "model"
HEADS_DIR = "heads"


@dataclass
class ServedHead:
    task: str
    directory: Path  # model.safetensors (the head's tensors) + config.json (its task class and labels)
    prefix: str  # the task class's base_model_prefix, under which the encoder goes


@dataclass
class ServingSpec:
    kind: str
    heads: list[ServedHead] = field(default_factory=list)


def _config(directory: Path) -> dict | None:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def serving_spec(model_dir: Path, heads: list[ServedHead] = ()) -> ServingSpec | None:
    """What a registered model can serve as, from its files and its tasks' heads; None: nothing transformers loads."""
    config = _config(model_dir)
    if config is None or "model_type" not in config:
        return None
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return ServingSpec("causal-lm")
    images = (model_dir / "preprocessor_config.json").is_file() and not (model_dir / "tokenizer_config.json").is_file()
    if heads or any(a.endswith(("ForSequenceClassification", "ForImageClassification")) for a in architectures):
        return ServingSpec("image-classification" if images else "text-classification", list(heads))
    return ServingSpec("features")


def package(model_dir: Path, spec: ServingSpec, out: Path, files: list[str], *, by_reference: bool = False,
            sha256: dict[str, str] | None = None) -> None:
    """An MLflow pyfunc model at `out` (absent or empty) serving the checkpoint in `model_dir`. `by_reference`: the
    checkpoint's files are hard links to `model_dir`'s (the store entry's), not copies, so a local MLflow store
    holds no second copy of the bytes (`share_files`). `sha256`: each file's, as the store recorded it: loading
    the model checks them, so changed bytes are never served."""
    import mlflow.pyfunc

    data = out.parent / (out.name + ".data")
    shutil.rmtree(data, ignore_errors=True)
    (data / MODEL_DIR).mkdir(parents=True)
    if not by_reference:  # symbolic links here are followed: save_model copies the data directory once
        for name in files:
            if (model_dir / name).is_file():
                (data / MODEL_DIR / name).symlink_to((model_dir / name).resolve())
    heads = []
    for head in spec.heads:
        (data / HEADS_DIR).mkdir(exist_ok=True)
        (data / HEADS_DIR / head.task).symlink_to(Path(head.directory).resolve(), target_is_directory=True)
        heads.append({"task": head.task, "prefix": head.prefix})
    (data / SPEC).write_text(json.dumps({"kind": spec.kind, "heads": heads, "sha256": sha256 or {}}, indent=2))
    try:
        mlflow.pyfunc.save_model(str(out), loader_module="registry.serving", data_path=str(data),
                                 signature=_signature(spec.kind),
                                 pip_requirements=["mergeyard", "transformers", "torch", "safetensors", "pandas"])
    finally:
        shutil.rmtree(data, ignore_errors=True)
    if by_reference:
        (saved,) = [p.parent for p in out.rglob(SPEC)]
        share_files(model_dir, saved / MODEL_DIR, files)


def share_files(source: Path, target: Path, files: list[str]) -> None:
    """`target/NAME` the same file as `source/NAME` for each of `files` there: a hard link (both are the registry's
    own: the store entry and MLflow's artifacts), a copy (a reflink where the filesystem can) only across
    filesystems. Not a symbolic link: MLflow refuses to download an artifact that resolves outside its artifact
    directory."""
    from registry.store import clone_file

    target.mkdir(parents=True, exist_ok=True)
    for name in files:
        src = Path(source) / name
        if not src.is_file():
            continue
        try:
            os.link(src, target / name)
        except OSError:
            clone_file(src, target / name)


INPUT_COLUMN = {"text-classification": "text", "image-classification": "image", "causal-lm": "prompt",
                "features": "text"}


def _signature(kind: str):
    """The input column each kind reads, and the parameters it takes at inference (`task`, `max_new_tokens`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = [ParamSpec("task", "string", "")] if kind.endswith("classification") else \
        [ParamSpec("max_new_tokens", "long", 32)] if kind == "causal-lm" else []
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN[kind])]),
                          params=ParamSchema(params) if params else None)


def checkpoint_dir(artifacts: Path) -> Path | None:
    """The checkpoint inside a downloaded pyfunc model's artifacts, if they are one of ours."""
    found = sorted(artifacts.glob(f"*/{SPEC}")) + sorted(artifacts.glob(f"*/*/{SPEC}"))
    return found[0].parent / MODEL_DIR if found else None


# ---- the pyfunc side: what MLflow imports to load a model (keep imports inside: serving starts fast) ----------


def _first_column(frame, preferred: tuple[str, ...]):
    for name in preferred:
        if name in frame.columns:
            return frame[name].tolist()
    return frame.iloc[:, 0].tolist()


class MergeyardPyfunc:
    def __init__(self, root: Path):
        self.root = root
        self.spec = json.loads((root / SPEC).read_text())
        self.model_dir = root / MODEL_DIR
        self._check_bytes()
        self._tasks: dict[str, Any] = {}
        self._model = None
        self._preprocess = None

    def _check_bytes(self) -> None:
        """Every checkpoint file's sha256 against the store's record before anything is loaded from it (a hard link
        shares the store entry's inode, so bit rot there is bit rot here)."""
        import hashlib

        from merging.errors import MergeyardError

        for name, recorded in (self.spec.get("sha256") or {}).items():
            h = hashlib.sha256()
            with open(self.model_dir / name, "rb") as fh:
                while block := fh.read(8 << 20):
                    h.update(block)
            if h.hexdigest() != recorded:
                raise MergeyardError(f"{self.model_dir / name}: its bytes are not the ones registered (sha256 "
                                     f"{h.hexdigest()[:16]}…, recorded {recorded[:16]}…); not served")

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    def _preprocessor(self):
        if self._preprocess is None:
            from transformers import AutoImageProcessor, AutoTokenizer

            load = AutoImageProcessor if self.kind == "image-classification" else AutoTokenizer
            self._preprocess = load.from_pretrained(self.model_dir)
        return self._preprocess

    def _task_models(self) -> dict[str, Any]:
        """task → its task model (the served encoder inside the head's task class, with the head's weights)."""
        if self._tasks:
            return self._tasks
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

        auto = AutoModelForImageClassification if self.kind == "image-classification" else AutoModelForSequenceClassification
        if not self.spec["heads"]:  # the checkpoint is a task model itself
            self._tasks["label"] = auto.from_pretrained(self.model_dir).eval()
            return self._tasks
        import tempfile

        for head in self.spec["heads"]:
            with tempfile.TemporaryDirectory(prefix="mergeyard-serve-") as tmp:
                write_task_model(self.model_dir, self.root / HEADS_DIR / head["task"], head["prefix"], Path(tmp))
                self._tasks[head["task"]] = auto.from_pretrained(tmp).eval()
        return self._tasks

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd
        import torch

        params = params or {}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if self.kind == "causal-lm":
            return pd.DataFrame({"generated": self._generate(_first_column(frame, ("prompt", "text")), params)})
        if self.kind == "features":
            return pd.DataFrame({"features": self._features(_first_column(frame, ("text",)))})
        tasks = self._task_models()
        wanted = [params["task"]] if params.get("task") else list(tasks)
        unknown = [t for t in wanted if t not in tasks]
        if unknown:
            raise ValueError(f"no task {unknown[0]!r}; this model serves {', '.join(tasks)}")
        if self.kind == "image-classification":
            from PIL import Image

            images = [Image.open(p).convert("RGB") for p in _first_column(frame, ("image", "path"))]
            inputs = self._preprocessor()(images=images, return_tensors="pt")
        else:
            inputs = self._preprocessor()([str(t) for t in _first_column(frame, ("text",))], padding=True,
                                          truncation=True, return_tensors="pt")
        out = {}
        with torch.no_grad():
            for task in wanted:
                model = tasks[task]
                predicted = model(**inputs).logits.argmax(-1).tolist()
                out[task] = [model.config.id2label.get(i, str(i)) for i in predicted]
        return pd.DataFrame(out)

    def _generate(self, prompts: list[str], params: dict) -> list[str]:
        import torch
        from transformers import AutoModelForCausalLM

        if self._model is None:
            self._model = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
        tokenizer = self._preprocessor()
        out = []
        with torch.no_grad():
            for prompt in prompts:
                ids = tokenizer(str(prompt), return_tensors="pt")
                generated = self._model.generate(**ids, max_new_tokens=int(params.get("max_new_tokens", 32)),
                                                 do_sample=False, pad_token_id=tokenizer.pad_token_id
                                                 if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
                out.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        return out

    def _features(self, texts: list[str]) -> list[list[float]]:
        import torch
        from transformers import AutoModel

        if self._model is None:
            self._model = AutoModel.from_pretrained(self.model_dir).eval()
        inputs = self._preprocessor()([str(t) for t in texts], padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = self._model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1)).tolist()


def write_task_model(encoder_dir: Path, head_dir: Path, prefix: str, out: Path) -> None:
    """A directory transformers loads as the head's task model: the encoder's tensors under `prefix.`, the head's
    tensors, the head's config (its task class and labels), the encoder's tokenizer and preprocessing files."""
    from safetensors.torch import save_file

    from merging.checkpoints.checkpoint import Checkpoint
    from merging.checkpoints.companions import PREPROCESSOR_FILES, TOKENIZER_FILES, companion_files

    encoder, head = Checkpoint(encoder_dir), Checkpoint(head_dir)
    state = {f"{prefix}.{n}": encoder.read(n).contiguous() for n in encoder.names}
    state.update({n: head.read(n).contiguous() for n in head.names})
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(head_dir / "config.json", out / "config.json")
    for source in companion_files(encoder_dir, TOKENIZER_FILES + PREPROCESSOR_FILES):
        shutil.copyfile(source, out / source.name)


def _load_pyfunc(data_path: str) -> MergeyardPyfunc:
    """MLflow's entry point (the `loader_module` contract)."""
    return MergeyardPyfunc(Path(data_path))
