"""Reading a user's YAML (recipes, suites, pipelines, gates) with errors that name the file, the line and the key.

`read_yaml` keeps the line of every key and list item, so a pydantic error on
`tasks.1.label` can say "line 12". Aliases are expanded with a budget: a
document that would expand to more than `MAX_NODES` nodes (a "billion laughs"
alias bomb) is refused before anything is built from it.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from merging.errors import MergeyardError

MAX_NODES = 200_000


@dataclass
class YamlDoc:
    path: Path | None
    data: Any
    lines: dict[tuple, int] = field(default_factory=dict)

    def line(self, loc: tuple) -> int | None:
        """The line of the deepest key of `loc` the document has."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return None


class _Builder:
    def __init__(self, error: type[MergeyardError], where: str):
        self.loader = yaml.SafeLoader("")
        self.error = error
        self.where = where
        self.nodes = 0
        self.lines: dict[tuple, int] = {}

    def build(self, node, path: tuple) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.error(f"{self.where}: the document expands to more than {MAX_NODES:,} values "
                             "(aliases nested too deep?); refusing to read it")
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            out = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise self.error(f"{self.where} line {key_node.start_mark.line + 1}: a key must be a plain value")
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                items.append(self.build(item, path + (i,)))
            return items
        return self.loader.construct_object(node, deep=True)


def parse_yaml(text: str, error: type[MergeyardError], where: str, path: Path | None = None) -> YamlDoc:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where}{at}: not valid YAML ({problem})") from None
    if node is None:
        return YamlDoc(path, None)
    builder = _Builder(error, where)
    try:
        data = builder.build(node, ())
    except yaml.YAMLError as exc:
        raise error(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return YamlDoc(path, data, builder.lines)


MAX_YAML_BYTES = 16 << 20  # recipes, suites, gates and pipelines are hand-written: far smaller


def read_yaml(path: str | Path, error: type[MergeyardError], what: str) -> YamlDoc:
    """Parse the YAML file at `path` (a `what`: recipe, suite, ...), or raise `error` in one line."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a device or a pipe would be read for ever
            raise error(f"{path}: not a regular file; a {what} is a YAML file")
        if info.st_size > MAX_YAML_BYTES:
            raise error(f"{path}: {info.st_size} bytes; a {what} is a YAML file of at most {MAX_YAML_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise error(f"{path}: cannot read {what} ({reason})") from None
    return parse_yaml(text, error, str(path), path)


def validation_problems(exc: ValidationError, doc: YamlDoc | None = None, root: str = "") -> str:
    """pydantic's errors on one line: `key.path (line N): message; ...`."""
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        name = ".".join(_shown(p) for p in loc) or root or "document"
        line = doc.line(loc) if doc is not None else None
        at = f" (line {line})" if line else ""
        parts.append(f"{name}{at}: {one_line(err['msg'].removeprefix('Value error, '))}")
    return "; ".join(parts)


def _shown(part) -> str:
    """A key as the message shows it: as written, or quoted where it holds a space, a dot or a control character."""
    text = str(part)
    return text if text and text.isprintable() and " " not in text and "." not in text else repr(text)


def one_line(text: str) -> str:
    return " ".join(str(text).split("\n"))
