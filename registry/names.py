"""Model names: what a user types, what the registry records, and the MLflow registered model that mirrors it —
one and the same string, so two names can never share an MLflow model.

A name is 1 to 128 characters of letters (any script), digits, '-' and '_', starting with a letter or digit.
That is what MLflow accepts in a registered-model name (it refuses '/', ':', '.', '%' and quotes) and what
`models:/NAME@alias` URIs carry without escaping. A name typed otherwise is refused in one line that suggests
one; a name mergeyard derives (a file's stem, a hub repository) is made into one.
"""

from __future__ import annotations

import re

from registry.errors import RegistryError

NAME = re.compile(r"[^\W_][\w-]{0,127}")
_OTHER = re.compile(r"[^\w-]+")


def shown(text: str) -> str:
    """`text` quoted for a message, whatever bytes it came from (a name that is not UTF-8 arrives as surrogates)."""
    try:
        text.encode("utf-8")
        return repr(text)
    except UnicodeEncodeError:
        return ascii(text)


def derived_name(text: str) -> str:
    """A valid name made from free text: runs of other characters become '-'."""
    name = _OTHER.sub("-", text.encode("utf-8", "replace").decode("utf-8")).strip("-_")[:128].strip("-_")
    return name if NAME.fullmatch(name) else "model"


def check_name(name: str) -> str:
    """`name`, if it is one; else a one-line error saying what would be."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RegistryError(f"model name {shown(name)} is not allowed: use 1 to 128 letters, digits, '-' and '_', "
                            f"starting with a letter or digit (e.g. {derived_name(str(name))!r}); MLflow names its "
                            "models with them, one to one")
    return name
