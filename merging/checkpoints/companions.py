"""The files beside a checkpoint's tensors that make it loadable by transformers (or open_clip).

The store keeps them with every model, and a merge's output carries its base's
(or a recipe's `tokenizer_source:`), so `AutoModel.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` work on what mergeyard writes. They are
not part of the content digest, which covers tensors only.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILES = ("config.json", "generation_config.json", "open_clip_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json")
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")
MODEL_FILES = CONFIG_FILES + TOKENIZER_FILES + PREPROCESSOR_FILES


def companion_files(directory: Path, names: tuple[str, ...] = MODEL_FILES) -> list[Path]:
    """The loadability files `directory` holds, in a fixed order."""
    return [directory / n for n in names if (directory / n).is_file()]
