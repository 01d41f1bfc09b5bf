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

from registry.errors import RegistryError

EXPERIMENT = "mergeyard"


def registered_name(name: str) -> str:
    """MLflow registered-model names: keep them to characters every store and URI accepts."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", name).strip("-") or "model"


@dataclass(frozen=True)
class MirroredModel:
    model_id: str
    name: str
    version: str


class MlflowMirror:
    def __init__(self, tracking_uri: str, artifact_root: Path):
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root)

    @cached_property
    def client(self):
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines would drown the CLI's output
        # create_model_version resolves `models:/<id>` sources through the process-wide tracking URI,
        # whatever the client was given: both must point at the same store.
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @cached_property
    def experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        # A tracking server decides where artifacts go (`--serve-artifacts`); only a local store needs a location.
        remote = self.tracking_uri.startswith(("http://", "https://", "databricks"))
        try:
            return self.client.create_experiment(
                EXPERIMENT, artifact_location=None if remote else self.artifact_root.resolve().as_uri())
        except MlflowException:  # created meanwhile by another process
            return self.client.get_experiment_by_name(EXPERIMENT).experiment_id

    def register_model(self, name: str, model_dir: Path, tags: dict[str, str], source_run_id: str | None = None,
                       serving=None, files: list[str] | None = None) -> MirroredModel:
        """A logged model + registered version. With a `serving` spec its artifacts are an MLflow pyfunc model
        (registry.serving) holding the checkpoint's `files`, else the checkpoint directory as it is."""
        import tempfile

        from mlflow.entities import LoggedModelStatus
        from mlflow.exceptions import MlflowException

        rname = registered_name(name)
        try:
            logged = self.client.create_logged_model(self.experiment_id, name=rname, source_run_id=source_run_id,
                                                     tags=tags, model_type="mergeyard-pyfunc" if serving else "safetensors")
            if serving is not None:
                from registry.serving import package

                with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
                    package(Path(model_dir), serving, Path(tmp) / "model", files or [])
                    self.client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
            else:
                self.client.log_model_artifacts(logged.model_id, str(model_dir))
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
            try:
                self.client.create_registered_model(rname)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = self.client.create_model_version(rname, source=f"models:/{logged.model_id}", run_id=source_run_id,
                                                       tags=tags, model_id=logged.model_id)
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
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"mergeyard.kind": "merge"})
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
                                           **(extra_tags or {})})
        run_id = run.info.run_id
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

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        if metrics:
            self.log_metrics(run_id, metrics)
        for path in artifacts:
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(registered_name(name), alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        self.client.delete_registered_model_alias(registered_name(name), alias)

    WITNESS_TAG = "mergeyard.audit_head"

    def set_audit_head(self, chain: str, seq: int, head: str) -> None:
        """The audit chain's head, kept in MLflow as a witness the lineage database cannot rewrite alone. `chain`
        names the log (registry.audit_chain.log_name), so two registries sharing one MLflow keep two witnesses."""
        self.client.set_experiment_tag(self.experiment_id, f"{self.WITNESS_TAG}.{chain[:16]}", f"{seq}:{head}")

    def audit_head(self, chain: str) -> tuple[int, str] | None:
        tag = self.client.get_experiment(self.experiment_id).tags.get(f"{self.WITNESS_TAG}.{chain[:16]}")
        if not tag:
            return None
        seq, _, head = tag.partition(":")
        return int(seq), head

    def alias_version(self, name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(registered_name(name), alias).version)
        except MlflowException:
            return None
