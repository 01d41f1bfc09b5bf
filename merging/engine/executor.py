"""Running a merge plan in this process: the units in order, each merged chunk by chunk and streamed into its shard.

The executor does what the plan says and nothing more: the model-wide preparation first (global TIES's map over
every tensor, then its reduce), a data-informed method's solve, then every unit (merged with the parameters the
plan gives it, or copied from the reference), each output checked finite after its cast, then the method's
finalize patches. The writer hashes shards as it writes them and renames the directory in only when complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from merging.checkpoints.inputs import MergeInputs, check_input_finite
from merging.checkpoints.finite import all_finite
from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.safetensors_format import DTYPE_NAMES, DTYPES
from merging.engine.plan import MergePlan, TensorUnit
from merging.engine.writer import CheckpointWriter
from merging.errors import NonFiniteError
from merging.methods.registry import MergeMethod, Solved


@dataclass
class Executed:
    digest: str
    files: list[str]
    file_sha256: dict[str, str]
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class LocalExecutor:
    """Runs a plan on one device of this process."""

    spec: MergeMethod
    inputs: MergeInputs  # the views the plan's byte ranges describe, ready to read chunk by chunk
    reference: Checkpoint
    views: list[Checkpoint]  # every input as merged: a culprit is looked for among them when an output is not finite
    progress: Callable[[str, int, int], None] | None = None

    def run(self, plan: MergePlan, writer: CheckpointWriter, solved: Solved | None,
            card: Callable[[str], dict[str, str]], companions: list[Path],
            before_commit: Callable[[], None] | None = None) -> Executed:
        phases = {}
        try:
            t0 = time.perf_counter()
            params = self.spec.params.model_validate(plan.parameters)
            state = self.spec.prepare(self.inputs, params) if self.spec.prepare else None
            phases["prepare"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            total = sum(self.reference.entries[u.name].nbytes for u in plan.units)
            done = 0
            for unit in plan.units:
                self._write(unit, params, state, solved, writer)
                done += self.reference.entries[unit.name].nbytes
                if self.progress:
                    self.progress("merge", done, total)
            for patch in self.spec.finalize(state) if self.spec.finalize else []:
                writer.patch(patch.name, patch.indices, patch.values)
            phases["merge"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if before_commit is not None:
                before_commit()
            # The digest is known only once the shards are complete; the card is written after it.
            digest, files = writer.commit_with(card, companions)
            phases["commit"] = time.perf_counter() - t0
        except BaseException:
            writer.abort()
            raise
        return Executed(digest, files, dict(writer.file_sha256), phases)

    def _write(self, unit: TensorUnit, params: Any, state: Any, solved: Solved | None,
               writer: CheckpointWriter) -> None:
        writer.begin_tensor(unit.name)
        if unit.action == "copy":
            writer.write(unit.name, self.reference.read(unit.name))  # integer buffers are copied, not merged
            return
        out_dtype = DTYPES[unit.dtype]
        for merged in [solved.state[unit.name]] if solved is not None else self._merged(unit, params, state):
            out = merged.to(out_dtype)
            if not all_finite(out):
                for view in self.views:  # blame an input if one is at fault
                    check_input_finite(view, unit.name)
                raise NonFiniteError(f"the merge produced NaN or infinity in tensor {unit.name!r} (as "
                                     f"{DTYPE_NAMES[out_dtype]}); lower lambda/weights or use out_dtype: float32")
            writer.write(unit.name, out)

    def _merged(self, unit: TensorUnit, params: Any, state: Any):
        """The unit's merged chunks, with the parameters and weights the plan gives this tensor."""
        tensor = self.inputs.tensor(unit.name)
        if unit.params is not None:  # a varying recipe: this tensor's own values
            params = self.spec.params.model_validate(unit.params)
            if unit.weights is not None:
                tensor.weights = list(unit.weights)
            if unit.overrides is not None:
                tensor.overrides = [dict(o) for o in unit.overrides]
        return self.spec.merge(tensor, params, state)
