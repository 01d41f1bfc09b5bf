"""Running a merge plan: the steps every executor takes, and the one that runs them in this process.

An executor does what the plan says and nothing more: the model-wide preparation first (global TIES's map over
every tensor, then its reduce), then every unit (`merging.engine.units`: merged with the parameters the plan gives
it, written from a data-informed method's solve, or copied from the reference), then the method's finalize
patches. Units reach the writer in the plan's order whoever computed them, so the digest does not depend on the
executor. The writer hashes shards as it writes them and renames the directory in only when complete.
`merging.engine.dask_executor` runs the same steps on a Dask cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.inputs import MergeInputs
from merging.engine.plan import MergePlan, TensorUnit
from merging.engine.units import unit_chunks
from merging.engine.writer import CheckpointWriter
from merging.methods.registry import MergeMethod, Solved


@dataclass
class Executed:
    digest: str
    files: list[str]
    file_sha256: dict[str, str]
    phases: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # where units ran (a cluster's executor says)


@dataclass
class Executor:
    """The steps of a plan's execution; a subclass says where preparation and units run."""

    spec: MergeMethod
    inputs: MergeInputs  # the views the plan's byte ranges describe, ready to read chunk by chunk
    reference: Checkpoint
    progress: Callable[[str, int, int], None] | None = None

    def run(self, plan: MergePlan, writer: CheckpointWriter, solved: Solved | None,
            card: Callable[[str], dict[str, str]], companions: list[Path],
            before_commit: Callable[[], None] | None = None) -> Executed:
        phases: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            params = self.spec.params.model_validate(plan.parameters)
            state = self.prepare(params) if self.spec.prepare and solved is None else None
            phases["prepare"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            total = sum(self.reference.entries[u.name].nbytes for u in plan.units) or 1
            done = 0
            for unit, chunks in self.outputs(plan, params, state, solved):
                writer.begin_tensor(unit.name)
                for chunk in chunks:
                    writer.write(unit.name, chunk)
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
        finally:
            self.close()
        return Executed(digest, files, dict(writer.file_sha256), phases, self.details())

    def prepare(self, params: Any) -> Any:
        raise NotImplementedError

    def outputs(self, plan: MergePlan, params: Any, state: Any,
                solved: Solved | None) -> Iterator[tuple[TensorUnit, Iterator[torch.Tensor]]]:
        """Each unit in the plan's order with its output chunks; what accumulates for `finalize` folded into
        `state` by the time the last is handed out."""
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@dataclass
class LocalExecutor(Executor):
    """Runs a plan in this process, on its device, one unit at a time streamed chunk by chunk into the writer."""

    def prepare(self, params: Any) -> Any:
        return self.spec.prepare(self.inputs, params)

    def outputs(self, plan, params, state, solved):
        for unit in plan.units:
            yield unit, unit_chunks(self.spec, unit, params, state, self.inputs, self.reference, solved)
