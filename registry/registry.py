"""The registry: models by digest, merge runs, lineage, evaluations, scores.

Every write is one database transaction, mirrored to MLflow inside it: if the
mirror fails the transaction rolls back, and if the commit fails the mirror is
compensated, so neither store claims a model the other does not have. A
model's bytes live in the content-addressed store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

import registry.audit  # noqa: F401  (installs the append-only guard)
from merging.checkpoints.alignment import Alignment
from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.digest import checkpoint_digest
from merging.checkpoints.digest_cache import DigestCache
from merging.checkpoints.lora import is_peft_adapter
from merging.references import parse_ref
from registry.adapters import LoraAdapters
from registry.audit_chain import intact
from merging.runtime.crashpoints import crashpoint
from registry.db import ensure_schema, make_engine, retry_when_locked
from registry.errors import AmbiguousModelError, ModelNotFoundError, RegistryError
from registry.names import check_name, derived_name
from registry.recovery import Heartbeat, owner_columns, reap_interrupted
from registry.measurements import Measurements, SuiteEvaluation
from registry.model_info import ModelInfo, Parent
from registry.mlflow_mirror import MirroredModel, MlflowMirror
from registry.serving import ServedHead, serving_spec
from registry.schema import LineageEdge, MergeRun, Model, PromotionEvent, utcnow
from registry.sources import resolve_source
from registry.statistics import StatisticsArtifacts, is_statistics
from registry.store import ModelStore
from registry.stored_bytes import StoredBytes
from registry.validation import check_base, validate_checkpoint
from merging.runtime.processes import owner_token

_HEX_PREFIX = re.compile(r"^(sha256:)?([0-9a-f]{8,64})$")

OUTPUT_NOTES = "outputs"  # beside scratch: notes of outputs being written outside the home (`tracked_output`)


@dataclass(frozen=True)
class RegistryConfig:
    database_url: str
    store_root: Path
    scratch: Path
    mlflow_tracking_uri: str | None  # None: no MLflow mirror (library use; the CLI always mirrors)
    mlflow_artifact_root: Path
    hf_cache: Path | None = None
    digest_cache: Path | None = None  # None: every input is hashed each time it is read


def _dominant_dtype(ckpt: Checkpoint) -> str:
    counts = Counter()
    for entry in ckpt.entries.values():
        counts[entry.dtype] += entry.numel
    return counts.most_common(1)[0][0]


class Registry(StoredBytes, Measurements, StatisticsArtifacts, LoraAdapters):
    def __init__(self, config: RegistryConfig, *, auto_upgrade: bool = True, reap: bool = True):
        self.config = config
        self.engine = make_engine(config.database_url)
        if auto_upgrade:
            ensure_schema(self.engine)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        self.store = ModelStore(config.store_root)
        self.digests = DigestCache(config.digest_cache)
        self.mirror = MlflowMirror(config.mlflow_tracking_uri, config.mlflow_artifact_root, config.scratch,
                                   expect_existing=self._has_mirrored) if config.mlflow_tracking_uri else None
        self._heartbeats: dict[int, Heartbeat] = {}
        self.restored: list[str] = []  # digests whose damaged stored copy this process put back
        # runs a killed process left `running` are failed here, by whichever command comes next
        self.reaped = reap_interrupted(self) if reap else []

    def _has_mirrored(self) -> bool:
        with self.Session() as s:
            return s.scalar(select(Model.id).where(Model.mlflow_model_id.is_not(None)).limit(1)) is not None

    def refuse_managed(self, path: Path) -> None:
        """The store and MLflow's artifacts are written only by the registry itself (temporary, then renamed), and a
        model registered by reference is its user's files, the registry's only copy: no output goes over them."""
        target = Path(path).resolve()
        for root, what in ((self.config.store_root, "the model store"), (self.config.mlflow_artifact_root,
                                                                          "MLflow's artifact store")):
            root = Path(root).resolve()
            if target == root or root in target.parents:
                raise RegistryError(f"{path} is inside {what} ({root}), which only the registry writes; "
                                    "write elsewhere")
        with self.Session() as s:
            references = s.execute(select(Model.name, Model.store_path).where(Model.store_path.like("/%"))).all()
        for name, stored in references:
            ref = Path(stored)
            ref_dir = ref if ref.is_dir() else ref.parent
            if target in (ref, ref_dir) or ref_dir in target.parents or target in ref_dir.parents:
                raise RegistryError(f"{path} would write over {ref}, the files of {name}, registered by reference "
                                    "(the registry holds no other copy); write elsewhere")

    @contextmanager
    def tracked_output(self, out: Path | None):
        """While a command writes `out` outside the home, a note of it in the home: a process killed mid-write
        leaves `.NAME.tmp-OWNER-*` beside `out`, which `mergeyard doctor` then finds by the note and removes."""
        if out is None:
            yield
            return
        notes = Path(self.config.scratch).parent / OUTPUT_NOTES
        notes.mkdir(parents=True, exist_ok=True)
        note = notes / f"{owner_token()}-{uuid.uuid4().hex[:8]}.json"
        note.write_text(json.dumps({"out": str(Path(out).resolve()), "owner": owner_token()}))
        try:
            yield
        finally:
            note.unlink(missing_ok=True)

    def _info(self, row: Model) -> ModelInfo:
        return ModelInfo.of(row, self.store.root)

    def close(self) -> None:
        for run_id in list(self._heartbeats):
            self._stop_heartbeat(run_id)
        self.engine.dispose()

    # ---- lookups ----------------------------------------------------------------------------

    def find_digest(self, digest: str) -> ModelInfo | None:
        with self.Session() as s:
            row = s.scalar(select(Model).where(Model.digest == digest))
            return self._info(row) if row else None

    def get(self, model_id: int) -> ModelInfo:
        with self.Session() as s:
            return self._info(s.get(Model, model_id))

    def resolve(self, ref: str) -> ModelInfo:
        """MODEL: a digest or unique prefix (≥ 8 hex), a name (its newest model), or NAME@ALIAS."""
        with self.Session() as s:
            if "@" in ref and "://" not in ref:
                name, _, alias = ref.rpartition("@")
                holder = self.alias_holder(s, name, alias)
                if holder is None:
                    raise ModelNotFoundError(f"no model holds {name}@{alias}; see `mergeyard audit --alias {alias}`")
                return self._info(s.get(Model, holder))
            match = _HEX_PREFIX.match(ref)
            if match:
                rows = s.scalars(select(Model).where(Model.digest.like(f"sha256:{match.group(2)}%")).limit(2)).all()
                if len(rows) > 1:
                    raise AmbiguousModelError(f"digest prefix {ref!r} matches several models; give more characters")
                if rows:
                    return self._info(rows[0])
            row = s.scalar(select(Model).where(Model.name == ref).order_by(Model.created_at.desc(), Model.id.desc()).limit(1))
            if row is None:
                raise ModelNotFoundError(f"no model {ref!r} in the registry (a digest, name or NAME@ALIAS); "
                                         "`mergeyard models list` shows them")
            return self._info(row)

    def list_models(self) -> list[ModelInfo]:
        with self.Session() as s:
            return [self._info(r) for r in s.scalars(select(Model).order_by(Model.id))]

    def alias_holder(self, s: Session, name: str, alias: str, unwitnessed: bool = False) -> int | None:
        """The model NAME@ALIAS names: the latest `promoted` event's in the audit chain, once the chain verifies to
        MLflow's witness of its head (`verified_head`) and that event names a model of that name. A row outside
        the chain (written into the table by hand, with no place in it) is not read. `unwitnessed`: MLflow lost
        its witness and the chain verifies in itself (what `doctor --fix` republishes the witness from)."""
        event = s.scalar(
            select(PromotionEvent)
            .where(PromotionEvent.model_name == name, PromotionEvent.alias == alias, PromotionEvent.decision == "promoted",
                   PromotionEvent.seq.is_not(None))
            .order_by(PromotionEvent.seq.desc()).limit(1)
        )
        if event is None:
            return None
        self.verified_head(s, f"{name}@{alias}", unwitnessed)
        model = s.get(Model, event.model_id)
        if model is None or model.name != name or not intact(s, event):
            raise RegistryError(f"the audit event that moved {name}@{alias} (event {event.id}) does not check out "
                                "(its hash or its model do not match): run `mergeyard audit --verify`")
        return event.model_id

    def verified_head(self, s: Session, what: str = "an alias", unwitnessed: bool = False) -> tuple[int, str]:
        """The audit chain's head, walked from the head verified last (kept beside the digest cache, so the walk
        stays short however long the log grows) and compared with MLflow's witness. A log that does not verify —
        an event edited, removed, inserted in the chain, a cut tail, a rewrite — resolves no alias: RegistryError."""
        from registry.audit_chain import effective_witness, log_name, walk

        chain = log_name(self) if self.mirror is not None else ""
        try:
            return self._verified_head(s, chain, what, unwitnessed)
        except RegistryError:
            # a promotion commits its event and moves MLflow's witness as one step under the chain's lock; read
            # between the two, a sound log looks cut or extended. Wait for that lock, then judge once more.
            from registry.audit_chain import lock_chain

            lock_chain(s)
            return self._verified_head(s, chain, what, unwitnessed)

    def _verified_head(self, s: Session, chain: str, what: str, unwitnessed: bool) -> tuple[int, str]:
        from registry.audit_chain import effective_witness, walk

        since = self._verified_checkpoint(chain)
        seq, head, problem = walk(s, since)
        if problem is not None and since is not None:  # the checkpoint itself is gone or changed: walk it all
            seq, head, problem = walk(s, None)
        if problem is None and self.mirror is not None:
            witness = effective_witness(s, self.mirror, chain)
            if witness is None and seq and not unwitnessed:
                problem = f"MLflow keeps no witness of its head (`mergeyard doctor --fix` publishes it if it verifies)"
            elif witness is not None and witness != (seq, head):
                problem = (f"its head is event {seq}, MLflow's witness saw event {witness[0]} "
                           f"{'with another hash' if witness[0] == seq else ''}: it was cut, extended or rewritten "
                           "without mergeyard")
        if problem is not None:
            detail = problem if isinstance(problem, str) else f"event {problem.seq}: {problem.kind}, {problem.detail}"
            raise RegistryError(f"{what} is not resolved from an audit log that does not verify ({detail}); "
                                "run `mergeyard audit --verify`")
        self._save_checkpoint(chain, seq, head)
        return seq, head

    def _checkpoint_file(self) -> Path | None:
        return self.config.digest_cache.parent / "audit-verified.json" if self.config.digest_cache else None

    def _verified_checkpoint(self, chain: str) -> tuple[int, str] | None:
        path = self._checkpoint_file()
        try:
            seq, head = json.loads(path.read_text())[chain] if path is not None else (None, None)
            return (int(seq), str(head)) if seq else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save_checkpoint(self, chain: str, seq: int, head: str) -> None:
        path = self._checkpoint_file()
        if path is None or not seq:
            return
        try:
            known = json.loads(path.read_text()) if path.is_file() else {}
            if not isinstance(known, dict):
                known = {}
            known[chain] = [seq, head]
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, path)  # whole or not at all
        except (OSError, ValueError):
            pass  # only the next walk's length depends on it

    # ---- writes -----------------------------------------------------------------------------

    def ingest(self, uri: str, name: str | None = None, base: str | None = None,
               by_reference: bool = False) -> tuple[ModelInfo, bool]:
        """Validate, store and record a checkpoint. Returns (model, created); the same bytes again are a no-op.

        With a declared base, a task model that wraps it (`bert.encoder…` around `encoder…`) is accepted, and
        its head (the tensors outside the base) is registered too, linked to it in lineage. `by_reference`: a
        local checkpoint is recorded where it is, not copied; every later read checks it is unchanged."""
        if name is not None:
            check_name(name)  # before anything is read
        base_info = None
        if base:  # a registered model, or a path or URI (ingested first)
            base_info = self.ingest(base)[0] if parse_ref(base).is_source else self.resolve(base)
        with resolve_source(uri, hf_cache=self.config.hf_cache, scratch=self.config.scratch,
                            mlflow_tracking_uri=self.config.mlflow_tracking_uri) as src:
            if by_reference and not src.uri.startswith("file://"):
                raise RegistryError(f"{uri}: only a local path can be registered by reference (this one is fetched)")
            if is_peft_adapter(src.path):
                return self.ingest_adapter(src, name, base_info)
            ckpt = Checkpoint(src.path)
            if is_statistics(ckpt):  # a model's published Fisher or Grams, not a model
                validate_checkpoint(ckpt)
                return self.register_statistics(ckpt, name or derived_name(src.default_name), src.uri)
            label = src.uri.removeprefix("file://")
            digest, checksums = self.scan(ckpt)
            alignment = check_base(ckpt, Checkpoint(base_info.store_path) if base_info else None, label=label,
                                   base_label=f"{base_info.name} ({base_info.digest[:19]})" if base_info else None)
            existing = self.find_digest(digest)
            if existing is not None:  # the same bytes: a no-op, but a base now declared is recorded
                self.restore_if_damaged(existing, ckpt)  # (a model registered by reference stays so)
                return (self.declare_base(existing, base_info) if base_info else existing), False
            model, created = self.register(ckpt, digest, kind="ingested", name=name or derived_name(src.default_name),
                                           source_uri=src.uri, revision=src.revision, architecture=src.architecture,
                                           base_model_id=base_info.id if base_info else None,
                                           tensor_checksums=checksums, reference=by_reference)
        if alignment is not None and alignment.wraps:
            self.register_head(model, alignment)
        return model, created

    def declare_base(self, model: ModelInfo, base: ModelInfo) -> ModelInfo:
        """Record `base` as the model's declared base where none was (a candidate first ingested as a recipe
        input, then named with its base); a different declared base is left as it is."""
        if model.base_model_id is not None or model.id == base.id:
            return model

        def write() -> ModelInfo:
            with self.Session.begin() as s:
                row = s.get(Model, model.id)
                if row.base_model_id is None:
                    row.base_model_id = base.id
                return self._info(row)

        return retry_when_locked(write)

    def register_head(self, model: ModelInfo, alignment: Alignment) -> ModelInfo:
        """A task model's head (its tensors outside the base it wraps) as a model of its own, kind `head`, linked
        to the task model by a `head` lineage edge; the same head again is the same row. Heads are not mirrored
        to MLflow: they are a part of their fine-tune, which is."""
        source = Checkpoint(model.store_path)
        tensors = {n: source.read(n).contiguous() for n in alignment.head}
        config = Path(model.store_path) / "config.json"
        with self.scratch_checkpoint(tensors, "head", companions=[config] if config.is_file() else []) as ckpt:
            digest = checkpoint_digest(ckpt)
            existing = self.find_digest(digest)
            if existing is not None:
                return existing
            head, _ = self.register(ckpt, digest, kind="head", name=f"{model.name}-head",
                                    source_uri=f"mergeyard://head-of/{model.digest}", architecture=model.architecture,
                                    parents=[Parent(model, "head", details={"prefix": alignment.prefix})],
                                    mirror=False)
        return head

    @contextmanager
    def scratch_checkpoint(self, tensors: dict, prefix: str, metadata: dict[str, str] | None = None,
                           companions: list[Path] = ()) -> Iterator[Checkpoint]:
        """`tensors` as a checkpoint in a scratch directory of this process (with copies of `companions`), for
        registering a derived model; removed on exit (the store keeps its own copy)."""
        from safetensors.torch import save_file

        self.config.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{prefix}-{owner_token()}-", dir=self.config.scratch) as tmp:
            save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
            for file in companions:
                shutil.copyfile(file, Path(tmp) / file.name)
            yield Checkpoint(tmp)

    def register(self, ckpt: Checkpoint, digest: str, *, kind: str, name: str, source_uri: str,
                 revision: str | None = None, architecture: str | None = None, base_model_id: int | None = None,
                 parents: list[Parent] = (), merge_run_id: int | None = None,
                 in_transaction: Callable[[Session, Model], None] | None = None,
                 mlflow_run_id: str | None = None, mirror: bool = True,
                 serving_heads: list[ServedHead] = (),
                 tensor_checksums: dict[str, str] | None = None, move: bool = False,
                 written_sha256: dict | None = None, reference: bool = False) -> tuple[ModelInfo, bool]:
        """Store the bytes and record the model (and whatever `in_transaction` adds) atomically. MLflow gets it as a
        pyfunc model where transformers can load it (serving each of `serving_heads`' tasks). `move`: the files are
        the registry's own scratch output, renamed into the store rather than copied; `written_sha256` then holds
        the sha256 the engine took of each file as it wrote it (`ModelStore.put`)."""
        check_name(name)  # before a byte is stored: one name, one MLflow registered model
        origin = {"name": name, "kind": kind, "source_uri": source_uri, "revision": revision, "architecture": architecture}
        if reference:
            path, files, created = self.store.put_reference(ckpt, digest, origin=origin)
        else:
            if not move:  # the scan that took the digest hashed each file too, where it read it front to back
                written_sha256 = {f.name: known for f in ckpt.files if (known := self.digests.file_sha256(f))}
            path, files, created = self.store.put(ckpt, digest, move=move, origin=origin, written_sha256=written_sha256)
        crashpoint("register.stored")  # a complete store entry that no row names

        def forget_entry() -> None:  # a store entry this call created and no row came to name
            if created and self.find_digest(digest) is None:
                self.store.remove(digest)

        try:
            return retry_when_locked(
                lambda: self._record(ckpt, digest, path, files, created, kind=kind, name=name, source_uri=source_uri,
                                     revision=revision, architecture=architecture, base_model_id=base_model_id,
                                     parents=parents, merge_run_id=merge_run_id, in_transaction=in_transaction,
                                     mlflow_run_id=mlflow_run_id, mirror=mirror, serving_heads=serving_heads,
                                     tensor_checksums=tensor_checksums))
        except BaseException:  # whatever failed (MLflow, the database, the disk): no entry stays that no row names
            forget_entry()
            raise

    def _record(self, ckpt: Checkpoint, digest: str, path: Path, files: list[dict], created: bool, *, kind: str,
                name: str, source_uri: str, revision: str | None, architecture: str | None,
                base_model_id: int | None, parents: list[Parent], merge_run_id: int | None,
                in_transaction: Callable[[Session, Model], None] | None, mlflow_run_id: str | None, mirror: bool,
                serving_heads: list[ServedHead], tensor_checksums: dict[str, str] | None) -> tuple[ModelInfo, bool]:
        mirrored: MirroredModel | None = None
        # by reference: the row names the user's checkpoint itself (and MLflow's version its path, registry.mlflow_mirror)
        reference = any(Path(f["path"]).is_absolute() for f in files)
        model_dir = ckpt.files[0].parent if reference else path
        try:
            with self.Session.begin() as s:
                row = Model(
                    digest=digest, name=name, kind=kind, source_uri=source_uri, resolved_revision=revision,
                    files=files, architecture=architecture, base_model_id=base_model_id,
                    num_params=ckpt.num_params, dtype=_dominant_dtype(ckpt), size_bytes=ckpt.nbytes,
                    store_path=str(Path(ckpt.path).resolve()) if reference else path.name,
                    tensor_checksums=tensor_checksums or None,
                )
                s.add(row)
                s.flush()  # a concurrent ingest of the same bytes fails here, before anything is mirrored
                for p in parents:
                    s.add(LineageEdge(parent_id=p.model.id, child_id=row.id, role=p.role, step=p.step, weight=p.weight,
                                      details=p.details, merge_run_id=merge_run_id))
                if in_transaction is not None:
                    in_transaction(s, row)
                if self.mirror is not None and mirror:
                    tags = {"mergeyard.digest": digest, "mergeyard.source": source_uri, "mergeyard.kind": kind,
                            "mergeyard.parents": ",".join(p.model.digest for p in parents)}
                    mirrored = self.mirror.register_model(name, model_dir, tags, source_run_id=mlflow_run_id,
                                                          serving=serving_spec(model_dir, list(serving_heads)),
                                                          files=[Path(f["path"]).name for f in files],
                                                          sha256={Path(f["path"]).name: f["sha256"] for f in files
                                                                  if f.get("sha256")},
                                                          reference=str(Path(ckpt.path).resolve()) if reference
                                                          else None)
                    row.mlflow_model_id, row.mlflow_version = mirrored.model_id, mirrored.version
                crashpoint("register.mirrored")  # MLflow has the version, the transaction has not committed
                info = self._info(row)
        except IntegrityError:
            if mirrored is not None:
                self.mirror.unregister(mirrored)
            existing = self.find_digest(digest)
            if existing is None:
                raise
            return existing, False
        except OperationalError:  # `register` retries a lock timeout (reusing the stored copy) or removes it
            if mirrored is not None:
                self.mirror.unregister(mirrored)
            raise
        except BaseException:
            if mirrored is not None:
                self.mirror.unregister(mirrored)
            if created and self.find_digest(digest) is None:
                self.store.remove(digest)
            raise
        return info, True

    # ---- merge runs -------------------------------------------------------------------------

    def begin_merge_run(self, *, method: str, recipe_json: str, recipe_hash: str, seed: int, mergeyard_version: str,
                        environment: dict, code_revision: str | None, params: dict[str, str]) -> int:
        mlflow_run_id = self.mirror.start_merge_run(f"{method}-{recipe_hash[7:19]}", params) if self.mirror else None

        def insert() -> int:
            with self.Session.begin() as s:
                run = MergeRun(method=method, recipe_json=recipe_json, recipe_hash=recipe_hash, seed=seed,
                               mergeyard_version=mergeyard_version, code_revision=code_revision,
                               environment=environment, status="running", mlflow_run_id=mlflow_run_id, **owner_columns())
                s.add(run)
                s.flush()
                return run.id

        run_id = retry_when_locked(insert)  # many first-use jobs at once outwait SQLite's busy timeout here too
        self._heartbeats[run_id] = Heartbeat(self, run_id)
        return run_id

    def _stop_heartbeat(self, run_id: int) -> None:
        beat = self._heartbeats.pop(run_id, None)
        if beat is not None:
            beat.stop()

    def complete_merge_run(self, run_id: int, out_dir: Path, digest: str, name: str, parents: list[Parent],
                           seconds: float, evaluations: list[SuiteEvaluation] = (),
                           details: dict | None = None, heads: list[ServedHead] = (),
                           recipe_json: str | None = None, move: bool = False,
                           written_sha256: dict[str, str] | None = None,
                           plan: tuple[str, str] | None = None) -> ModelInfo:
        """Record the merged model, its lineage edges, its evaluations and the run's success in one transaction.
        `move`: `out_dir` is scratch the registry owns; its files are renamed into the store, not copied (and those
        in `written_sha256`, hashed as the engine wrote them, are not read again). `plan`: the (digest, JSON) of
        the merge plan the run executed."""
        self._stop_heartbeat(run_id)
        with self.Session() as s:
            mlflow_run_id = s.get(MergeRun, run_id).mlflow_run_id

        def finish(s: Session, row: Model) -> None:
            run = s.get(MergeRun, run_id)
            run.status, run.output_model_id = "succeeded", row.id
            run.finished_at, run.seconds, run.details = utcnow(), seconds, details
            if recipe_json is not None:  # what the method settled (its hash stays the request's: reuse finds it)
                run.recipe_json = recipe_json
            if plan is not None:
                run.plan_digest, run.plan_json = plan
            for e in evaluations:
                s.add_all(e.rows_for(row.id, mlflow_run_id))

        base = next((p.model for p in parents if p.role == "base"), None)
        info, created = self.register(
            Checkpoint(out_dir), digest, kind="merged", name=name, source_uri=f"mergeyard://merge-run/{run_id}",
            architecture=base.architecture if base else None, base_model_id=base.id if base else None,
            parents=parents, merge_run_id=run_id, in_transaction=finish, mlflow_run_id=mlflow_run_id,
            serving_heads=heads, move=move, written_sha256=written_sha256 if move else None,
        )
        if not created:  # the same bytes were made before: this run made them too
            with self.Session.begin() as s:
                run = s.get(MergeRun, run_id)
                run.status, run.output_model_id = "succeeded", info.id
                run.finished_at, run.seconds, run.details = utcnow(), seconds, details
                if recipe_json is not None:
                    run.recipe_json = recipe_json
                if plan is not None:
                    run.plan_digest, run.plan_json = plan
                for e in evaluations:
                    if not self._has_evaluation(s, info.id, e.suite_digest):
                        s.add_all(e.rows_for(info.id, mlflow_run_id))
        if self.mirror is not None and mlflow_run_id:
            metrics = {f"{e.suite_name}/{task}/{metric}": value for e in evaluations for task, metric, value in e.rows}
            self.mirror.finish_merge_run(mlflow_run_id, True, [p.model.mlflow_model_id for p in parents if p.model.mlflow_model_id],
                                         info.mlflow_model_id, metrics=metrics or None)
        return info

    def reusable_merge(self, recipe_hash: str, mergeyard_version: str) -> ModelInfo | None:
        """The model a succeeded run of this exact pinned recipe (same code version) produced, if one did."""
        with self.Session() as s:
            row = s.scalar(select(Model).join(MergeRun, MergeRun.output_model_id == Model.id)
                           .where(MergeRun.recipe_hash == recipe_hash, MergeRun.status == "succeeded",
                                  MergeRun.mergeyard_version == mergeyard_version)
                           .order_by(MergeRun.id).limit(1))
            return self._info(row) if row else None

    def fail_merge_run(self, run_id: int, error: str) -> None:
        self._stop_heartbeat(run_id)
        with self.Session.begin() as s:
            run = s.get(MergeRun, run_id)
            run.status, run.error, run.finished_at = "failed", error[:4000], utcnow()
            mlflow_run_id = run.mlflow_run_id
        if self.mirror is not None and mlflow_run_id:
            self.mirror.finish_merge_run(mlflow_run_id, False)

    def producing_run(self, model: ModelInfo) -> MergeRun | None:
        """The earliest successful merge run that produced `model` (None for ingested models)."""
        with self.Session() as s:
            return s.scalar(select(MergeRun).where(MergeRun.output_model_id == model.id, MergeRun.status == "succeeded")
                            .order_by(MergeRun.id).limit(1))

    def head_of(self, model: ModelInfo) -> tuple[ModelInfo, str] | None:
        """The registered head of a task model (or the head itself), with the prefix its encoder sits under."""
        with self.Session() as s:
            if model.kind == "head":
                edge = s.scalar(select(LineageEdge).where(LineageEdge.child_id == model.id, LineageEdge.role == "head"))
                return (model, (edge.details or {}).get("prefix", "")) if edge is not None else None
            row = s.execute(select(Model, LineageEdge.details).join(LineageEdge, LineageEdge.child_id == Model.id)
                            .where(LineageEdge.parent_id == model.id, LineageEdge.role == "head")
                            .order_by(LineageEdge.id.desc()).limit(1)).first()
            return (self._info(row[0]), (row[1] or {}).get("prefix", "")) if row else None

    def parents_of(self, model: ModelInfo) -> list[tuple[LineageEdge, ModelInfo]]:
        with self.Session() as s:
            rows = s.execute(select(LineageEdge, Model).join(Model, Model.id == LineageEdge.parent_id)
                             .where(LineageEdge.child_id == model.id).order_by(LineageEdge.id)).all()
            return [(edge, self._info(parent)) for edge, parent in rows]

    def count(self, table) -> int:
        with self.Session() as s:
            return s.scalar(select(func.count()).select_from(table))
