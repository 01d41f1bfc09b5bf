"""How a user names a model, parsed once: every recipe, config, the engine and the registry read it here.

    checkpoints/task-a.safetensors, ./base, /abs/dir, file://...   bytes on this machine (`file`)
    hf://ORG/NAME[@REV], open_clip://ARCH[/TAG], mlflow://NAME@ALIAS, mlflow://NAME/VERSION, s3://...
                                                                   bytes behind a source scheme
    sha256:3f1c..., 3f1c2a9e, tickets, tickets@production          a model already in the registry

A source (a path or a URI) is ingested on first use; anything else is looked
up in the registry. Which schemes exist is the registry's table of resolvers
(`registry.sources.RESOLVERS`): a new scheme is one entry there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_+.-]*)://")  # open_clip has an underscore


@dataclass(frozen=True)
class ModelRef:
    text: str  # as the user wrote it
    scheme: str | None  # "file", "hf", ...; None: a registry reference (digest, prefix, name, NAME@ALIAS)
    location: str  # what follows the scheme (for `file`, the path)

    @property
    def is_source(self) -> bool:
        """Names bytes to ingest (a path or a URI), not a registered model."""
        return self.scheme is not None

    @property
    def is_file(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> Path | None:
        return _expand(self.location) if self.is_file else None

    def __str__(self) -> str:
        """The canonical text: a local path as an absolute path, anything else as given."""
        return str(self.path) if self.is_file else self.text


def _expand(text: str) -> Path:
    """`~` and `~user` expanded; a `~user` naming no user here stays as written (pathlib raises RuntimeError),
    so it is looked up, and refused, like any other name that is not there."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def parse_ref(text: str, root: Path | None = None) -> ModelRef:
    """`text` as a model reference; a relative path counts where it exists, taken from `root` (a recipe's or a
    config's folder) or the working directory."""
    match = _SCHEME.match(text)
    if match:
        scheme, rest = match.group(1).lower(), text[match.end():]
        if scheme == "file":
            path = _expand(rest)
            if not path.is_absolute() and root is not None:
                path = root / path
            return ModelRef(text, "file", str(path.resolve()) if path.exists() else str(path))
        return ModelRef(text, scheme, rest)
    path = _expand(text)
    if not path.is_absolute() and root is not None:
        path = root / path
    if path.exists():
        return ModelRef(text, "file", str(path.resolve()))
    if Path(text).is_absolute():  # an absolute path that is not there yet is still a path, not a name
        return ModelRef(text, "file", text)
    return ModelRef(text, None, text)
