"""Parameter settings as mergekit writes them: a scalar, a gradient over layers, or per-tensor filters.

    density: 0.5                                   # a scalar
    t: [0, 0.5, 1]                                 # a gradient: interpolated over the layers
    t: [{filter: self_attn, value: [0, 1]},        # filters: the first whose substring is in the
        {filter: mlp, value: 0.3}, {value: 0.5}]   # tensor's name wins; no filter matches all

A layer tensor's position t is its layer index over (layers − 1), the first
layer 0 and the last 1; a tensor outside the layers (embeddings, final norm,
head) has t = 0, as in mergekit's single-slice plan. A numeric gradient of
n points interpolates linearly between neighbours at t·(n − 1); a gradient
of strings or booleans picks the point at int(t·(n − 1)).

Precedence, as mergekit's: a model's own parameters, then the recipe's,
then the method's default; inside one, the first matching filter. A filter
list that matches nothing falls through to the next level.
"""

from __future__ import annotations

from typing import Any, Iterable

Scalar = (bool, int, float, str)


def is_scalar(value: Any) -> bool:
    return isinstance(value, Scalar) or value is None


def is_plain(setting: Any) -> bool:
    """True for a single value, the same for every tensor."""
    return is_scalar(setting)


def _is_conditions(setting: Any) -> bool:
    return isinstance(setting, dict) or (isinstance(setting, list) and any(isinstance(e, dict) for e in setting))


def check_setting(setting: Any, where: str) -> None:
    """Raise ValueError unless `setting` is a scalar, a gradient of scalars, or filters of those."""
    if is_scalar(setting):
        return
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise ValueError(f"{where}: expected a value, a gradient list or a list of {{filter, value}}, got {setting!r}")
    if all(isinstance(e, Scalar) for e in setting):
        return
    for entry in setting:
        if not isinstance(entry, dict) or "value" not in entry or set(entry) - {"filter", "value"}:
            raise ValueError(f"{where}: each filter entry is {{filter: substring, value: ...}}, got {entry!r}")
        if entry.get("filter") is not None and not isinstance(entry["filter"], str):
            raise ValueError(f"{where}: a filter is a substring of tensor names, got {entry['filter']!r}")
        value = entry["value"]
        if not (is_scalar(value) or (isinstance(value, list) and value and all(isinstance(e, Scalar) for e in value))):
            raise ValueError(f"{where}: a filter's value is a value or a gradient, got {value!r}")


def canonical_setting(setting: Any) -> Any:
    """One spelling per meaning: a single filter mapping becomes a list, each entry {filter, value}."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and _is_conditions(setting):
        return [{"filter": None if e.get("filter") in (None, "*") else e["filter"], "value": e["value"]}
                for e in setting]
    return setting


def leaves(setting: Any) -> list[Any]:
    """Every value a setting can take at a gradient's points (what must pass the parameter's validation)."""
    if is_scalar(setting):
        return [setting]
    if isinstance(setting, dict):
        setting = [setting]
    out: list[Any] = []
    for e in setting:
        out += leaves(e["value"]) if isinstance(e, dict) else [e]
    return out


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of `setting` for one tensor at layer position `t`; None when a filter list matched nothing."""
    if is_scalar(setting):
        return setting
    if _is_conditions(setting):
        for cond in [setting] if isinstance(setting, dict) else setting:
            pattern = cond.get("filter")
            if pattern in (None, "*") or (tensor_name and pattern in tensor_name):
                return evaluate(cond["value"], tensor_name, t)
        return None
    points = list(setting)
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in points):
        return points[int(t * (len(points) - 1))]
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * points[i0] + frac * points[i1]


def first_defined(settings: Iterable[Any], tensor_name: str, t: float) -> Any:
    """The first of `settings` (highest precedence first, None where a level does not set it) that gives a value."""
    for setting in settings:
        if setting is None:
            continue
        value = evaluate(setting, tensor_name, t)
        if value is not None:
            return value
    return None
