"""The files beside a checkpoint's tensors that make it loadable by transformers (or open_clip).

The store keeps them with every model, and a merge's output carries its base's
(or a recipe's `tokenizer_source:`), so `AutoModel.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` work on what mergeyard writes. They are
not part of the content digest, which covers tensors only.
"""

from __future__ import annotations

import stat
from pathlib import Path

from merging.errors import CheckpointError

CONFIG_FILES = ("config.json", "generation_config.json", "open_clip_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json")
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")
MODEL_FILES = CONFIG_FILES + TOKENIZER_FILES + PREPROCESSOR_FILES


# a tokenizer.json of a 256k vocabulary is ~30 MB; anything past this is not a config or a tokenizer
MAX_COMPANION_BYTES = 256 << 20


def companion_files(directory: Path, names: tuple[str, ...] = MODEL_FILES) -> list[Path]:
    """The loadability files `directory` holds, in a fixed order. Each must be a regular file of at most
    MAX_COMPANION_BYTES inside the checkpoint: a link out of it (to a key, a file the user never named) or a
    pipe or device is refused in one line naming it, before anything is copied."""
    return [directory / n for n in names if _checked(directory, n)]


def _checked(directory: Path, name: str) -> bool:
    path = directory / name
    if not isinstance(path, Path):  # on object storage (a UPath): no links, no devices; only the size to check
        if not path.is_file():
            return False
        _check_size(path, path.stat().st_size)
        return True
    if not path.exists() and not path.is_symlink():
        return False
    if path.is_symlink():
        target = path.resolve()
        if not (_inside(target, directory) or _hub_blob(directory, target)):
            raise CheckpointError(f"{path}: a link to {target}, outside the checkpoint's directory; copy the file "
                                  "in if it belongs to the model")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a pipe, a device or a directory)")
    _check_size(path, info.st_size)
    return True


def _check_size(path, size: int) -> None:
    if size > MAX_COMPANION_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, more than a config or tokenizer file holds "
                              f"({MAX_COMPANION_BYTES >> 20} MiB at most)")


def _inside(target: Path, directory: Path) -> bool:
    return target == directory.resolve() or directory.resolve() in target.parents


def _hub_blob(directory: Path, target: Path) -> bool:
    """A Hugging Face hub cache snapshot (models--ORG--NAME/snapshots/COMMIT/) links its files to ../../blobs/."""
    return directory.resolve().parent.name == "snapshots" and target.parent == directory.resolve().parent.parent / "blobs"
