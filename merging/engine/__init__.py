"""The merge engine: a recipe in, a checkpoint directory out (`run_merge`), streaming tensor by tensor.

    run.py        run_merge: plan the recipe's merge, execute the plan, commit the output
    inputs.py     what a method sees: one tensor of every input, read in row chunks
    writer.py     sharded safetensors written and hashed as they stream, renamed in when complete
    model_card.py the Hugging Face card and mergeyard.json beside the shards

The public names below are loaded on first use: methods import `merging.engine.inputs`, and run.py imports
the methods, so this package must not import run.py when it is itself imported.
"""

from __future__ import annotations

_PUBLIC = ("OUT_DTYPES", "MergeResult", "choose_auto", "environment", "loadability_files", "local_path",
           "merge_in_memory", "resolve_device", "run_merge", "with_adapters_applied")


def __getattr__(name: str):
    if name in _PUBLIC:
        from merging.engine import run

        return getattr(run, name)
    raise AttributeError(f"module 'merging.engine' has no attribute {name!r}")
