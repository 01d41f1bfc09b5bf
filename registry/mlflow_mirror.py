"""The MLflow mirror: every registered model and merge run, browsable in the MLflow UI.

The lineage database is the source of truth; MLflow holds one hop at most.
Each model becomes an MLflow 3 logged model (its safetensors as artifacts, no
pickle) and a version of a registered model, tagged `mergeyard.digest`,
`mergeyard.source`, `mergeyard.parents`. Each merge is a run: recipe as params,
parents as run inputs, the merged model as run output. Promotion moves aliases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from typing import Callable

from merging.runtime.crashpoints import crashpoint
from registry.names import NAME
from registry.errors import MirrorLostError, RegistryError
from merging.runtime.processes import owner_token

OWNER_TAG = "mergeyard.owner"  # <host tag>-<pid> of the process that created a logged model or run
REFERENCE_TAG = "mergeyard.reference"  # the path of a model registered by reference (its version holds no artifacts)

EXPERIMENT = "mergeyard"
MLFLOW_SCHEMA_LOCK = 0x6D6C666C  # "mlfl": MLflow's first use of a PostgreSQL database, one process at a time


def registered_name(name: str) -> str:
    """The MLflow registered model mirroring the registry's `name`: the name itself (registry.names admits only what
    MLflow takes), so two names never share one. A row from before names were checked keeps the form it had."""
    if NAME.fullmatch(name):
        return name
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", name).strip("-") or "model"


@dataclass(frozen=True)
class MirroredModel:
    model_id: str
    name: str
    version: str


def local_path(artifact_location: str | None) -> Path | None:
    """A logged model's artifact directory when it is on this machine's filesystem (a `file:` URI)."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(artifact_location or "")
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


class MlflowMirror:
    def __init__(self, tracking_uri: str, artifact_root: Path, scratch: Path | None = None,
                 expect_existing: Callable[[], bool] | None = None):
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root)
        self.scratch = scratch
        # whether the lineage database says this mirror was written to: its experiment missing then means the
        # MLflow store was lost, and starting a new one would leave a mirror that silently lacks every older model
        self.expect_existing = expect_existing

    @cached_property
    def client(self):
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines would drown the CLI's output
        # create_model_version resolves `models:/<id>` sources through the process-wide tracking URI,
        # whatever the client was given: both must point at the same store.
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        local = self.tracking_uri.removeprefix("sqlite:///") if self.tracking_uri.startswith("sqlite:///") else None
        if self.tracking_uri.startswith(("postgresql", "mysql")):
            return self._first_use_on_a_database(mlflow)
        if not local:
            return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        # MLflow creates its SQLite schema on first use (the client's constructor does, and its model registry's
        # first call): first-use jobs at once would each run its migrations
        from filelock import FileLock

        with FileLock(local + ".lock", timeout=600):
            client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            client.search_registered_models(max_results=1)
        return client

    def _first_use_on_a_database(self, mlflow):
        """MLflow creates its schema on first use of a database too: first-use jobs at once would each run its
        migrations, and all but one fail. They take turns under an advisory lock of that database (PostgreSQL)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.tracking_uri)
        try:
            with engine.connect() as conn:
                postgres = engine.dialect.name == "postgresql"
                if postgres:
                    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MLFLOW_SCHEMA_LOCK})
                try:
                    client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
                    client.search_registered_models(max_results=1)
                finally:
                    if postgres:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MLFLOW_SCHEMA_LOCK})
        finally:
            engine.dispose()
        return client

    @cached_property
    def experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        if self.expect_existing is not None and self.expect_existing():
            raise MirrorLostError(f"the MLflow store at {self.tracking_uri} has lost the {EXPERIMENT!r} experiment "
                                  "the lineage database mirrored its models to; `mergeyard doctor --fix` rebuilds it")
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        # A tracking server decides where artifacts go (`--serve-artifacts`); only a local store needs a location.
        remote = self.tracking_uri.startswith(("http://", "https://", "databricks"))
        try:
            return self.client.create_experiment(
                EXPERIMENT, artifact_location=None if remote else self.artifact_root.resolve().as_uri())
        except MlflowException:  # created meanwhile by another process
            return self.client.get_experiment_by_name(EXPERIMENT).experiment_id

    def register_model(self, name: str, model_dir: Path, tags: dict[str, str], source_run_id: str | None = None,
                       serving=None, files: list[str] | None = None, reference: str | None = None,
                       sha256: dict[str, str] | None = None) -> MirroredModel:
        """A logged model + registered version. With a `serving` spec its artifacts are an MLflow pyfunc model
        (registry.serving) holding the checkpoint's `files`, else the checkpoint directory as it is. In a local
        MLflow store the files are the store entry's own (hard links): the bytes are on disk once. A model registered
        by `reference` (its path) gets a version with no artifacts, tagged with the path: copying it would undo
        what registering by reference is for, and linking it would let an edit of the user's file change MLflow's."""
        import tempfile

        from mlflow.entities import LoggedModelStatus
        from mlflow.exceptions import MlflowException

        rname = registered_name(name)
        try:
            if reference is not None:
                tags = {**tags, REFERENCE_TAG: reference}
            logged = self.client.create_logged_model(self.experiment_id, name=rname, source_run_id=source_run_id,
                                                     tags={**tags, OWNER_TAG: owner_token()}, model_type="mergeyard-pyfunc" if serving else "safetensors")
            local = local_path(logged.artifact_location)
            if reference is not None:
                pass
            elif local is not None:  # a local store: the artifacts share the store entry's files, not a second copy
                from registry.serving import package, share_files

                if serving is not None:
                    package(Path(model_dir), serving, local, files or [], by_reference=True, sha256=sha256)
                else:
                    share_files(Path(model_dir), local, files or [p.name for p in Path(model_dir).iterdir()])
            elif serving is not None:  # a tracking server: it must hold the bytes
                from registry.serving import package

                if self.scratch is not None:
                    Path(self.scratch).mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix=f"mlflow-model-{owner_token()}-", dir=self.scratch) as tmp:
                    package(Path(model_dir), serving, Path(tmp) / "model", files or [], sha256=sha256)
                    self.client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
            else:
                self.client.log_model_artifacts(logged.model_id, str(model_dir))
            crashpoint("mirror.artifacts-logged")  # a PENDING logged model with its artifacts
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
            try:
                self.client.create_registered_model(rname)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = self.client.create_model_version(rname, source=f"models:/{logged.model_id}", run_id=source_run_id,
                                                       tags=tags, model_id=logged.model_id)
            crashpoint("mirror.versioned")  # a version the lineage database never recorded
        except MlflowException as exc:
            raise RegistryError(f"MLflow ({self.tracking_uri}) refused the model: {exc.message.splitlines()[0]}") from None
        return MirroredModel(logged.model_id, rname, str(version.version))

    def unregister(self, mirrored: MirroredModel) -> None:
        """Compensate a registration whose database transaction failed."""
        from mlflow.exceptions import MlflowException

        for undo in (lambda: self.client.delete_model_version(mirrored.name, mirrored.version),
                     lambda: self.client.delete_logged_model(mirrored.model_id)):
            try:
                undo()
            except MlflowException:
                pass

    def start_merge_run(self, run_name: str, params: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"mergeyard.kind": "merge", OWNER_TAG: owner_token()})
        from mlflow.entities import Param

        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run.info.run_id

    def finish_merge_run(self, run_id: str, ok: bool, parent_model_ids: list[str] = (), output_model_id: str | None = None,
                         metrics: dict[str, float] | None = None) -> None:
        from mlflow.entities import LoggedModelInput, LoggedModelOutput

        if parent_model_ids:
            self.client.log_inputs(run_id, models=[LoggedModelInput(m) for m in parent_model_ids])
        if output_model_id:
            self.client.log_outputs(run_id, [LoggedModelOutput(output_model_id, step=0)])
        if metrics:
            self.log_metrics(run_id, metrics)
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    def log_evaluation(self, model_id: str | None, digest: str, suite: str, suite_digest: str,
                       metrics: dict[str, float], extra_tags: dict[str, str] | None = None) -> str:
        """An MLflow run holding one evaluation: metrics per task, the model as input."""
        from mlflow.entities import LoggedModelInput

        run = self.client.create_run(self.experiment_id, run_name=f"evaluate-{suite}",
                                     tags={"mergeyard.kind": "evaluation", "mergeyard.digest": digest,
                                           "mergeyard.suite": suite, "mergeyard.suite_digest": suite_digest,
                                           OWNER_TAG: owner_token(), **(extra_tags or {})})
        run_id = run.info.run_id
        crashpoint("mirror.evaluation-run-open")
        if model_id:
            self.client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
        self.log_metrics(run_id, metrics)
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """Add metrics to an existing run (a merge run gains its output's evaluations)."""
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        # MLflow names allow letters, digits, _ - . / and spaces: a harness metric `exact_match,strict-match` shows
        # as `exact_match-strict-match`
        self.client.log_batch(run_id, metrics=[Metric(re.sub(r"[^\w\-./ ]", "-", k), float(v), now, 0)
                                               for k, v in metrics.items()])

    def log_run(self, run_name: str, tags: dict[str, str], params: dict[str, str], metrics: dict[str, float],
                artifacts: list[Path]) -> str:
        """A finished run holding a result that is not a model (a MAP front: its plot and JSON)."""
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**tags, OWNER_TAG: owner_token()})
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        if metrics:
            self.log_metrics(run_id, metrics)
        for path in artifacts:
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def set_alias(self, name: str, alias: str, version: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_registered_model_alias(registered_name(name), alias, version)
        except MlflowException as exc:
            raise MirrorLostError(f"MLflow ({self.tracking_uri}) cannot point {name}@{alias} at version {version}: "
                                  f"{exc.message.splitlines()[0]}; `mergeyard doctor --fix` rebuilds the mirror "
                                  "from the lineage database") from None

    def delete_alias(self, name: str, alias: str) -> None:
        self.client.delete_registered_model_alias(registered_name(name), alias)

    WITNESS_TAG = "mergeyard.audit_head"

    def set_audit_head(self, chain: str, seq: int, head: str) -> None:
        """The audit chain's head, kept in MLflow as a witness the lineage database cannot rewrite alone. `chain`
        names the log (registry.audit_chain.log_name), so two registries sharing one MLflow keep two witnesses."""
        self.client.set_experiment_tag(self.experiment_id, f"{self.WITNESS_TAG}.{chain[:16]}", f"{seq}:{head}")

    PENDING_TAG = "mergeyard.audit_pending"

    def audit_head(self, chain: str, tag: str | None = None) -> tuple[int, str] | None:
        value = self.client.get_experiment(self.experiment_id).tags.get(f"{tag or self.WITNESS_TAG}.{chain[:16]}")
        if not value:
            return None
        seq, _, head = value.partition(":")
        return int(seq), head

    def set_audit_pending(self, chain: str, seq: int, head: str) -> None:
        """The head an uncommitted append will make: written before the commit, cleared after the witness moves.
        A process killed in between leaves it, and the log then tells which way the commit went (never an
        ambiguity an attacker's cut could hide in: without a pending head, a shorter log is a cut)."""
        self.client.set_experiment_tag(self.experiment_id, f"{self.PENDING_TAG}.{chain[:16]}", f"{seq}:{head}")

    def audit_pending(self, chain: str) -> tuple[int, str] | None:
        return self.audit_head(chain, self.PENDING_TAG)

    def clear_audit_pending(self, chain: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_experiment_tag(self.experiment_id, f"{self.PENDING_TAG}.{chain[:16]}")
        except MlflowException:
            pass

    def alias_version(self, name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(registered_name(name), alias).version)
        except MlflowException:
            return None

    def close_run(self, run_id: str, status: str) -> None:
        """End a run a killed process left RUNNING (KILLED), if MLflow still has it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_terminated(run_id, status=status)
        except MlflowException:
            pass
