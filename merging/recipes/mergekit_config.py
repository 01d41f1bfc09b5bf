"""mergekit's YAML, read as it is, translated into a mergeyard recipe with the same meaning.

A document with `merge_method:` is mergekit's. Each of its keys is either
translated exactly or refused with a one-line error naming it: a merge that
silently dropped a key would not be the merge its author asked for.

What changes in translation (so the canonical recipe, and the digest of the
merge, are the same whichever format described it):
  * mergekit's defaults are written out (`density: 1` for TIES, `normalize`),
    since mergeyard's own defaults differ in places;
  * `ties` is mergeyard's `ties` with `trim_scope: per_tensor`, `normalize`
    its `aggregate` (mean/sum); DARE's `density` is `drop_rate = 1 − density`;
    `linear` is `average` over every input, the base included;
  * the base, where mergekit lists it among the models, is the recipe's `base`;
  * a recipe-wide `weight` (or per-model key) becomes each model's fallback;
  * one slice whose sources span every layer is the same as `models:`;
  * `dtype` (mergekit's compute and default output dtype) is the output dtype:
    mergeyard always computes in float32; `int8_mask` only saves memory in
    mergekit and changes no value, so it is accepted and has no effect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from merging.errors import RecipeError
from merging.references import parse_ref
from merging.recipes.settings import canonical_setting, is_plain

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "dtype", "out_dtype", "tokenizer_source", "parameters"}
REFUSED_TOP = {
    "modules": "multi-module configs",
    "tokenizer": "a merged vocabulary (`tokenizer:`); use tokenizer_source: base or a model",
    "chat_template": "a chat template",
}

# mergekit's generalised task arithmetic: (mergeyard method, default normalize, default rescale)
_GTA = {
    "task_arithmetic": ("task_arithmetic", False, False),
    "ties": ("ties", True, False),
    "dare_linear": ("dare_linear", False, True),
    "dare_ties": ("dare_ties", False, True),
    "breadcrumbs": ("breadcrumbs", False, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", False, False),
    "della": ("della", True, True),
    "della_linear": ("della_linear", False, True),
}
# methods whose parameters carry over by name
_SAME = {"slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "nearswap"}
# the per-model keys mergekit has for each method (besides `weight`)
_PER_MODEL = {"ties": ("density",), "dare_linear": ("density",), "dare_ties": ("density",),
              "breadcrumbs": ("density", "gamma"), "breadcrumbs_ties": ("density", "gamma"),
              "della": ("density", "epsilon"), "della_linear": ("density", "epsilon")}
_NO_MODEL_WEIGHT = {"slerp", "nearswap", "karcher", "model_stock", "sce"}  # mergekit takes no `weight` there
_BASE_IS_INPUT = {"linear"}  # every input, the base too, is averaged with its own weight


def is_mergekit(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def map_setting(setting: Any, fn: Callable[[float], float]) -> Any:
    """`fn` applied to every number of a setting (a linear map commutes with a gradient's interpolation)."""
    if isinstance(setting, bool) or setting is None:
        return setting
    if isinstance(setting, (int, float)):
        return fn(float(setting))
    if isinstance(setting, dict):
        return {**setting, "value": map_setting(setting.get("value"), fn)}
    if isinstance(setting, list):
        return [map_setting(e, fn) for e in setting]
    return setting


def with_fallback(own: Any, fallback: Any) -> Any:
    """`own`, falling through to `fallback` where its filters match nothing (mergekit's precedence)."""
    if own is None:
        return fallback
    if fallback is None:
        return own
    own_c = canonical_setting(own)
    if isinstance(own_c, list) and own_c and isinstance(own_c[0], dict):
        fb = canonical_setting(fallback)
        tail = fb if isinstance(fb, list) and fb and isinstance(fb[0], dict) else [{"filter": None, "value": fb}]
        return own_c + tail
    return own


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"mergekit config: {where} must be a mapping")
    return dict(value)


def _model_ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"mergekit config: {where}: a model is a path or name (a string)")
    if "+" in value:
        raise RecipeError(f"mergekit config: {where}: {value!r} applies a LoRA with `+`; ingest the adapter and list "
                          "it as a model instead")
    return value


def _layer_count(ref: str, root: Path | None) -> int | None:
    """Layers of a local checkpoint, from its tensor names; None when `ref` is not a local path."""
    from merging.checkpoints.checkpoint import Checkpoint
    from merging.recipes.slices import layer_count

    parsed = parse_ref(ref, root)
    path = parsed.path if parsed.scheme in ("file", None) else None
    if path is None or not Path(path).exists():
        return None
    return layer_count(Checkpoint(Path(path)))


def _from_slices(slices: Any, root: Path | None) -> tuple[list[dict], dict, Any]:
    """One slice spanning every layer of its sources: its sources as models, its parameters, its base."""
    if not isinstance(slices, list) or len(slices) != 1:
        raise RecipeError("mergekit config: slices: mergeyard merges one slice spanning every layer; "
                          f"{len(slices) if isinstance(slices, list) else 'these'} slices (a frankenmerge) "
                          "are not supported")
    out_slice = _mapping(slices[0], "slices[0]")
    unknown = set(out_slice) - {"sources", "parameters", "base_model"}
    if unknown:
        raise RecipeError(f"mergekit config: slices[0]: mergeyard cannot honour {', '.join(sorted(unknown))}")
    models = []
    for n, src in enumerate(out_slice.get("sources") or []):
        src = _mapping(src, f"slices[0].sources[{n}]")
        unknown = set(src) - {"model", "layer_range", "parameters"}
        if unknown:
            raise RecipeError(f"mergekit config: slices[0].sources[{n}]: mergeyard cannot honour "
                              f"{', '.join(sorted(unknown))}")
        ref = _model_ref(src.get("model"), f"slices[0].sources[{n}].model")
        span = src.get("layer_range")
        count = _layer_count(ref, root)
        if count is None:
            raise RecipeError(f"mergekit config: slices[0].sources[{n}]: cannot check layer_range {span} of {ref} "
                              "(not a local checkpoint); use `models:`")
        if list(span or []) != [0, count]:
            raise RecipeError(f"mergekit config: slices[0].sources[{n}]: layer_range {span} is not every layer of "
                              f"{ref} ([0, {count}]); mergeyard merges whole models")
        models.append({"model": ref, "parameters": src.get("parameters")})
    if not models:
        raise RecipeError("mergekit config: slices[0] has no sources")
    return models, _mapping(out_slice.get("parameters"), "slices[0].parameters"), out_slice.get("base_model")


def translate(data: dict, root: Path | None = None) -> dict:
    """The mergeyard recipe (a mapping, for `parse_recipe`) meaning what the mergekit config `data` means; local
    paths (which slices' layer ranges are checked against) resolve against `root`, the config's folder."""
    for key, why in REFUSED_TOP.items():
        if key in data:
            raise RecipeError(f"mergekit config: `{key}:` ({why}) is not supported by mergeyard")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise RecipeError(f"mergekit config: unknown keys {', '.join(sorted(unknown))}")
    method = data["merge_method"]
    if method not in _GTA and method not in _SAME and method not in _BASE_IS_INPUT and method != "passthrough":
        raise RecipeError(f"mergekit config: merge_method {method!r} is not available in mergeyard "
                          "(`mergeyard methods` lists those that are)")
    if bool(data.get("models")) == bool(data.get("slices")):
        raise RecipeError("mergekit config: give exactly one of `models:` or `slices:`")
    params = _mapping(data.get("parameters"), "parameters")
    base = data.get("base_model")
    if method == "passthrough":
        return _passthrough(data, params)
    if data.get("slices"):
        entries, slice_params, slice_base = _from_slices(data["slices"], root)
        base = slice_base or base
        params = {k: with_fallback(slice_params.get(k), params.get(k)) for k in {*params, *slice_params}}
    else:
        entries = []
        for n, m in enumerate(data["models"]):
            m = {"model": m} if isinstance(m, str) else _mapping(m, f"models[{n}]")
            unknown = set(m) - {"model", "parameters"}
            if unknown:
                raise RecipeError(f"mergekit config: models[{n}]: mergeyard cannot honour {', '.join(sorted(unknown))}")
            entries.append({"model": _model_ref(m.get("model"), f"models[{n}].model"),
                            "parameters": _mapping(m.get("parameters"), f"models[{n}].parameters")})
    if base is not None:
        base = _model_ref(base, "base_model")
    for e in entries:
        e["parameters"] = _mapping(e.get("parameters"), "a model's parameters")

    # the base among the models is the base (except where mergekit averages it as one more input)
    if method in _BASE_IS_INPUT:
        if base is not None and all(e["model"] != base for e in entries):
            entries.append({"model": base, "parameters": {}})
        base = None
    elif base is not None:
        own = [e for e in entries if e["model"] == base]
        if any(e["parameters"] for e in own):
            raise RecipeError(f"mergekit config: the base model {base} sets parameters of its own, which "
                              f"{method!r} does not use for the base")
        entries = [e for e in entries if e["model"] != base]

    per_model = ("weight",) + _PER_MODEL.get(method, ())
    for e in entries:
        unknown = set(e["parameters"]) - set(per_model) - ({"weight"} if method in _NO_MODEL_WEIGHT else set())
        if unknown:
            raise RecipeError(f"mergekit config: model {e['model']}: {method!r} takes no per-model "
                              f"{', '.join(sorted(unknown))}")
        if method in _NO_MODEL_WEIGHT and "weight" in e["parameters"]:
            raise RecipeError(f"mergekit config: model {e['model']}: {method!r} takes no per-model weight")

    # a recipe-wide `weight` is every model's fallback
    shared_weight = params.pop("weight", None)
    models = []
    for e in entries:
        own = dict(e["parameters"])
        weight = with_fallback(own.pop("weight", None), shared_weight)
        entry: dict[str, Any] = {"model": e["model"]}
        if weight is not None and is_plain(weight):
            entry["weight"] = float(weight)
        elif weight is not None:
            own["weight"] = weight
        if own:
            entry["parameters"] = own
        models.append(entry)

    mapped_method, mapped_params = _method_params(method, params, models)
    recipe: dict[str, Any] = {"method": mapped_method, "base": base, "models": models, "parameters": mapped_params}
    return _with_output_keys(recipe, data)


def _with_output_keys(recipe: dict, data: dict) -> dict:
    """`recipe` with the config's output dtype (mergekit's `dtype` where `out_dtype` is not set) and tokenizer."""
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype is not None:
        recipe["out_dtype"] = out_dtype
    if data.get("tokenizer_source") is not None:
        recipe["tokenizer_source"] = data["tokenizer_source"]
    return recipe


def _passthrough(data: dict, params: dict) -> dict:
    """`passthrough`: one model copied, or slices of one source each stacked into a new model."""
    unknown = set(params) - {"scale"}
    if unknown:
        raise RecipeError(f"mergekit config: 'passthrough': mergeyard cannot honour parameters {', '.join(sorted(unknown))}")
    recipe: dict[str, Any] = {"method": "passthrough", "parameters": dict(params)}
    if data.get("base_model") is not None:
        raise RecipeError("mergekit config: 'passthrough' takes no base_model")
    if data.get("models"):
        models = data["models"]
        if len(models) != 1:
            raise RecipeError("mergekit config: 'passthrough' copies one model; use slices to stack several")
        m = {"model": models[0]} if isinstance(models[0], str) else _mapping(models[0], "models[0]")
        if set(m) - {"model"} and _mapping(m.get("parameters"), "models[0].parameters"):
            raise RecipeError("mergekit config: 'passthrough': per-model parameters (scale) are not supported; set "
                              "`parameters: {scale: ...}` for the whole merge")
        recipe["models"] = [{"model": _model_ref(m.get("model"), "models[0].model")}]
    else:
        slices = []
        for n, out_slice in enumerate(data["slices"] or []):
            out_slice = _mapping(out_slice, f"slices[{n}]")
            unknown = set(out_slice) - {"sources"}
            sources = out_slice.get("sources") or []
            if unknown or len(sources) != 1:
                raise RecipeError(f"mergekit config: slices[{n}]: passthrough takes one source per slice and no "
                                  f"{', '.join(sorted(unknown)) or 'more'}")
            src = _mapping(sources[0], f"slices[{n}].sources[0]")
            if set(src) - {"model", "layer_range"}:
                raise RecipeError(f"mergekit config: slices[{n}].sources[0]: mergeyard cannot honour "
                                  f"{', '.join(sorted(set(src) - {'model', 'layer_range'}))}")
            span = src.get("layer_range")
            if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)):
                raise RecipeError(f"mergekit config: slices[{n}].sources[0]: layer_range must be [start, end]")
            slices.append({"model": _model_ref(src.get("model"), f"slices[{n}].sources[0].model"), "layer_range": span})
        recipe["slices"] = slices
    return _with_output_keys(recipe, data)


def _method_params(method: str, params: dict, models: list[dict]) -> tuple[str, dict]:
    params = dict(params)
    params.pop("int8_mask", None)  # memory only: no value changes
    if method in _SAME:
        return method, params
    if method == "linear":
        out = {"normalize": params.pop("normalize", True)}
        _none_left(method, params)
        return "average", out
    target, default_normalize, default_rescale = _GTA[method]
    normalize = params.pop("normalize", default_normalize)
    rescale = params.pop("rescale", default_rescale)
    out: dict[str, Any] = {}
    if "lambda" in params:
        out["lambda"] = params.pop("lambda")
    if method == "task_arithmetic":
        if normalize:
            raise RecipeError("mergekit config: task_arithmetic with normalize: true is not supported; scale the "
                              "weights to sum to one instead")
        if params.get("density") == 1:  # mergekit's default: nothing trimmed
            params.pop("density")
        _none_left(method, params)
        return target, out
    density = params.pop("density", 1.0)
    if method == "ties":
        if rescale:
            raise RecipeError("mergekit config: ties with rescale: true is not supported (mergeyard's TIES does not "
                              "rescale)")
        out |= {"trim_scope": "per_tensor", "aggregate": "mean" if normalize else "sum", "density": density}
    elif method in ("dare_linear", "dare_ties"):
        if method == "dare_linear" and normalize:
            raise RecipeError("mergekit config: dare_linear with normalize: true is not supported; use weights "
                              "summing to one")
        out |= {"drop_rate": map_setting(density, lambda d: 1.0 - d), "rescale": rescale}
        if method == "dare_ties":
            out["aggregate"] = "mean" if normalize else "sum"
        for m in models:  # DARE's per-model density is its drop rate's complement
            own = m.get("parameters") or {}
            if "density" in own:
                own["drop_rate"] = map_setting(own.pop("density"), lambda d: 1.0 - d)
    else:  # breadcrumbs, della: the same names
        out |= {"density": density, "normalize": normalize, "rescale": rescale}
        for key in ("gamma", "epsilon"):
            if key in params:
                out[key] = params.pop(key)
    _none_left(method, params)
    return target, out


def _none_left(method: str, params: dict) -> None:
    if params:
        raise RecipeError(f"mergekit config: {method!r}: mergeyard cannot honour parameters "
                          f"{', '.join(sorted(params))}")
