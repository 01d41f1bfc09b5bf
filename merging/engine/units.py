"""One unit of a merge plan, computed: what every executor runs, in this process or on a Dask worker.

A unit's output is a pure function of the plan's unit (its tensor, its parameters and weights), the method, the
state the model-wide preparation settled (global TIES's thresholds) and the inputs' bytes. The kernels are the
same wherever they run, so the bytes are too: an executor only decides where units run and in which order their
outputs reach the writer (always the plan's).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.finite import all_finite
from merging.checkpoints.inputs import MergeInputs, check_input_finite
from merging.checkpoints.safetensors_format import DTYPE_NAMES, DTYPES
from merging.engine.plan import TensorUnit
from merging.errors import NonFiniteError
from merging.methods.registry import MergeMethod, Solved


def unit_chunks(spec: MergeMethod, unit: TensorUnit, params: Any, state: Any, inputs: MergeInputs,
                reference: Checkpoint, solved: Solved | None = None) -> Iterator[torch.Tensor]:
    """The unit's output, chunk by chunk, in its output dtype: merged (with the parameters and weights the plan
    gives this tensor), written from a solve, or the reference's buffer copied. An output that is not finite
    after its cast raises, blaming an input if one is at fault."""
    if unit.action == "copy":
        yield reference.read(unit.name)  # integer buffers are copied, not merged
        return
    out_dtype = DTYPES[unit.dtype]
    for merged in [solved.state[unit.name]] if solved is not None else _merged(spec, unit, params, state, inputs):
        out = merged.to(out_dtype)
        if not all_finite(out):
            for view in [inputs.base] * (inputs.base is not None) + list(inputs.models):
                check_input_finite(view, unit.name)
            raise NonFiniteError(f"the merge produced NaN or infinity in tensor {unit.name!r} (as "
                                 f"{DTYPE_NAMES[out_dtype]}); lower lambda/weights or use out_dtype: float32")
        yield out


def _merged(spec: MergeMethod, unit: TensorUnit, params: Any, state: Any, inputs: MergeInputs):
    tensor = inputs.tensor(unit.name)
    if unit.params is not None:  # a varying recipe: this tensor's own values
        params = spec.params.model_validate(unit.params)
        if unit.weights is not None:
            tensor.weights = list(unit.weights)
        if unit.overrides is not None:
            tensor.overrides = [dict(o) for o in unit.overrides]
    return spec.merge(tensor, params, state)
