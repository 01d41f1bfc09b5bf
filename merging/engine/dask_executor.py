"""Running a merge plan on a Dask cluster, with the same bytes as in one process.

The driver (the process that opened the recipe) ships the inputs' views once to every worker (headers and paths:
a few kB per input), and then:

  * the model-wide preparation as a map-reduce: groups of tensors mapped on the workers (global TIES's
    histograms of |τ| bit patterns, summed within a group), the partials reduced on the driver — integer sums, so
    the grouping and the order change nothing;
  * every unit of the plan as a task: a worker reads only the byte ranges its tensor needs (memory-mapped from a
    shared filesystem, or ranged reads from object storage: `merging.checkpoints.remote`), computes it with the
    kernels the local executor runs (`merging.engine.units`) and returns the output bytes; what the finalize step
    needs (global TIES's sign sum and zero-sum entries) comes back with them from a fresh copy of the state;
  * the writer, on the driver, takes the outputs in the plan's order (a bounded window of units in flight), so
    the shards, the digest and the commit are the local executor's. Output is one (N+1)-th of what is read, so
    the driver's link carries the least of the traffic.

A worker that dies loses its running units: Dask runs them again on another (the nanny restarts it), with the
same result. A data-informed method solves on the driver (its objective is there); its units are written there.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.inputs import MergeInputs
from merging.engine.executor import Executor
from merging.engine.plan import TensorUnit
from merging.engine.units import unit_chunks
from merging.errors import MergeyardError
from merging.methods.registry import MergeMethod
from merging.runtime.allocator import tune_for_large_tensors


def _map_group(prepare: Any, stage: int, context: Any, inputs: MergeInputs, names: list[str]) -> Any:
    partial = None
    for name in names:
        part = prepare.map(stage, context, inputs.tensor(name))
        partial = part if partial is None else prepare.combine(stage, partial, part)
    return partial


def _unit_task(spec: MergeMethod, unit: TensorUnit, params: Any, state: Any, inputs: MergeInputs,
               reference: Checkpoint) -> tuple[np.ndarray, Any, dict]:
    """One unit on a worker: its output bytes, the state it accumulated for `finalize`, and where it ran."""
    t0 = time.perf_counter()
    state = copy.deepcopy(state)  # each unit from its own fresh copy, whatever the scheduler shares between tasks
    chunks = [c.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
              for c in unit_chunks(spec, unit, params, state, inputs, reference)]
    out = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    return out, state, {"worker": _worker_address(), "bytes_read": sum(r.length for r in unit.reads),
                        "seconds": time.perf_counter() - t0}


def _worker_address() -> str:
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:  # run outside a worker (a test's synchronous scheduler)
        return "local"


def in_dask_worker() -> bool:
    """Whether this code runs in a task on a Dask worker (then `on_dask('current')` reaches its cluster)."""
    try:
        from distributed import get_worker
    except ImportError:
        return False
    try:
        get_worker()
    except ValueError:
        return False
    return True


@dataclass
class DaskExecutor(Executor):
    """Runs a plan's preparation and units on the workers of `client` (a `distributed.Client`)."""

    client: Any = None
    window: int | None = None  # units in flight at once (default: twice the cluster's threads)
    _shipped: Any = field(default=None, init=False, repr=False)
    _workers: dict[str, dict[str, float]] = field(default_factory=dict, init=False, repr=False)
    _pending: deque = field(default_factory=deque, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.client is None:
            raise MergeyardError("a Dask executor needs a client (distributed.Client) connected to a scheduler")
        threads = sum(self.client.nthreads().values())
        if not threads:
            raise MergeyardError(f"the Dask scheduler at {self.client.scheduler.address} has no workers")
        self.window = self.window or 2 * threads
        # what workers read through: the views without this process's callbacks (progress, other refs' resolver)
        shipped = (replace(self.inputs, progress=None, resolve=None), self.reference)
        self._shipped = self.client.scatter([shipped], broadcast=True, hash=False)[0]
        self._token = uuid.uuid4().hex[:12]

    def prepare(self, params: Any) -> Any:
        prep = self.spec.prepare
        mapped, carry = prep.begin(self.inputs, params)
        if not mapped:
            return carry
        groups = self._groups(self.inputs.names)
        for stage in range(prep.passes):
            context = prep.context(stage, carry)
            futures = [self.client.submit(_map_inputs, prep, stage, context, self._shipped, group,
                                          key=f"mergeyard-prepare-{self._token}-{stage}-{g}")
                       for g, group in enumerate(groups)]
            for g, future in enumerate(futures):  # in order: the same reduce on every run (integers besides)
                prep.reduce(stage, carry, future.result())
                if self.progress:
                    self.progress(f"prepare {stage + 1}/{prep.passes}", g + 1, len(futures))
            prep.settle(stage, carry)
        return prep.finish(carry)

    def outputs(self, plan, params, state, solved):
        if solved is not None:  # solved on the driver: nothing is left to compute, the tensors are here
            for unit in plan.units:
                yield unit, unit_chunks(self.spec, unit, params, state, self.inputs, self.reference, solved)
            return
        finalize = self.spec.finalize
        fresh = finalize.fresh(state) if finalize else state
        units, pending = list(plan.units), self._pending
        submitted = 0
        for position, unit in enumerate(units):
            while submitted < len(units) and len(pending) < self.window:
                pending.append(self.client.submit(
                    _unit_on, self.spec, units[submitted], params, fresh, self._shipped,
                    key=f"mergeyard-unit-{self._token}-{submitted}", priority=len(units) - submitted))
                submitted += 1
            future = pending.popleft()
            out, part, where = future.result()
            future.release()
            if finalize:
                finalize.absorb(state, part)
            stats = self._workers.setdefault(where["worker"], {"units": 0, "bytes_read": 0, "seconds": 0.0})
            stats["units"] += 1
            stats["bytes_read"] += where["bytes_read"]
            stats["seconds"] += where["seconds"]
            yield unit, iter([torch.from_numpy(out)])

    def _groups(self, names: list[str]) -> list[list[str]]:
        """Tensors in contiguous groups of about equal bytes, a few per thread (the map's tasks)."""
        count = max(1, min(len(names), 4 * sum(self.client.nthreads().values())))
        sizes = [self.inputs.reference().entries[n].nbytes for n in names]
        target, groups, size = sum(sizes) / count, [[]], 0
        for name, nbytes in zip(names, sizes):
            if groups[-1] and size + nbytes > target:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        return groups

    def details(self) -> dict[str, Any]:
        return {"executor": {"kind": "dask", "scheduler": self.client.scheduler.address,
                             "workers": {w: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}
                                         for w, s in sorted(self._workers.items())}}}

    def close(self) -> None:
        if self._pending:  # stopped early (an error, an interrupt): what is still queued is not wanted
            self.client.cancel(list(self._pending))
            self._pending.clear()
        if self._shipped is not None:
            self._shipped.release()
            self._shipped = None


def _map_inputs(prepare, stage, context, shipped, names):
    tune_for_large_tensors()
    return _map_group(prepare, stage, context, shipped[0], names)


def _unit_on(spec, unit, params, state, shipped):
    tune_for_large_tensors()  # a worker restarted by its nanny tunes itself on its first unit
    inputs, reference = shipped
    return _unit_task(spec, unit, params, state, inputs, reference)


def connect(address: str | None, workers: int = 2):
    """A client of the scheduler at `address`, or of a LocalCluster of `workers` processes (one thread each) when
    `address` is None or 'local'. The caller closes it (and the cluster it started)."""
    from distributed import Client, LocalCluster

    if address in (None, "local"):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster)
    try:
        return Client(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise MergeyardError(f"no Dask scheduler answers at {address} ({exc}); start one (`dask scheduler`) or fix "
                             "the address") from None


@contextmanager
def on_dask(address: str | None, workers: int = 2) -> Iterator[Callable[..., DaskExecutor]]:
    """An executor factory for `run_merge` on the scheduler at `address` ('local': a LocalCluster of `workers`
    processes started here, and stopped after; 'current': the cluster this code runs on, from inside a task — a
    pipeline's merge step on Dask); the client is closed after."""
    if address == "current":
        from distributed import worker_client

        with worker_client() as client:  # the task steps out of the worker's thread pool while its units run
            yield partial(DaskExecutor, client=client)
        return
    client = connect(address, workers)
    try:
        yield partial(DaskExecutor, client=client)
    finally:
        cluster = client.cluster if address in (None, "local") else None
        client.close()
        if cluster is not None:
            cluster.close()
