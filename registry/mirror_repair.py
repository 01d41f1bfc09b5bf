"""The MLflow half of `mergeyard doctor`: the mirror checked against the lineage database, and rebuilt from it.

MLflow holds one hop of what SQL records. What a killed process leaves there (a PENDING logged model with partial
artifacts, a version whose transaction never committed, a run still RUNNING) is removed or closed once its owner
is gone; what MLflow lost (its whole store, or some versions) is registered again from the store, with the tags
and serving spec registration gives; aliases are set to where the audit log says they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select

from registry.findings import Finding, owner_gone
from registry.mlflow_mirror import OWNER_TAG, local_path, registered_name
from registry.schema import Model, PromotionEvent
from registry.serving import ServedHead, serving_spec

MIRRORED_KINDS = ("ingested", "merged")  # heads and statistics are parts of a model, not versions of their own


def _pages(call, **kwargs) -> list:
    out, token = [], None
    while True:
        page = call(**kwargs, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


class MirrorRepair:
    def __init__(self, doctor):
        self.doctor, self.registry = doctor, doctor.registry
        self.mirror = self.registry.mirror
        self.client = self.mirror.client
        self._handled: set[str] = set()  # logged models a version finding already removes

    def run(self) -> None:
        self.mirror.expect_existing = None  # a lost experiment is what this repairs: make it anew
        rows = self._rows()
        logged = {m.model_id: m for m in _pages(self.client.search_logged_models,
                                                experiment_ids=[self.mirror.experiment_id])}
        versions = self.unrecorded_versions(rows, logged)
        self.unrecorded_logged_models(rows, logged)
        self.missing_versions(rows, versions)
        self.aliases(rows)
        self.open_runs()
        self.audit_witness()

    def _rows(self) -> dict[str, Model]:
        with self.registry.Session() as s:
            return {m.digest: m for m in s.scalars(select(Model).where(Model.kind.in_(MIRRORED_KINDS)))}

    def _drop_logged(self, model_id: str, artifact_location: str | None) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_logged_model(model_id)
        except MlflowException:
            pass
        path = local_path(artifact_location)  # MLflow marks it deleted; its partial artifacts stay: remove them
        root = self.mirror.artifact_root.resolve()
        if path is not None and (root in path.resolve().parents):
            shutil.rmtree(path.parent if path.name == "artifacts" else path, ignore_errors=True)

    def unrecorded_logged_models(self, rows: dict[str, Model], logged: dict) -> None:
        """Logged models no row and no version records: PENDING ones a process was killed while logging, READY
        ones killed before their version was made."""
        from mlflow.entities import LoggedModelStatus

        recorded = {r.mlflow_model_id for r in rows.values()} | self._handled
        for model in logged.values():
            if model.model_id in recorded or "mergeyard.digest" not in (model.tags or {}):
                continue
            if not owner_gone(model.tags.get(OWNER_TAG)):
                continue
            state = "PENDING" if model.status == LoggedModelStatus.PENDING else "no version records it"
            self.doctor.found(Finding("pending-logged-model" if state == "PENDING" else "unrecorded-logged-model",
                                      model.model_id, f"{model.name}: {state}, left by process "
                                      f"{model.tags.get(OWNER_TAG)}", "delete it and its artifacts"),
                              lambda m=model: self._drop_logged(m.model_id, m.artifact_location))

    def unrecorded_versions(self, rows: dict[str, Model], logged: dict) -> dict[tuple[str, str], object]:
        """Versions tagged with a digest no row records under that name and version. Returns the recorded ones."""
        kept = {}
        for v in _pages(self.client.search_model_versions, filter_string=None):
            digest = (v.tags or {}).get("mergeyard.digest")
            if digest is None:
                continue
            row = rows.get(digest)
            if row is not None and row.mlflow_version == str(v.version) and registered_name(row.name) == v.name:
                kept[(v.name, str(v.version))] = v
                continue
            model_id = _model_id(v)
            owner = logged[model_id].tags.get(OWNER_TAG) if model_id in logged else None
            if owner_gone(owner) is None and owner is not None:
                continue  # its registration may still be committing
            self._handled.add(model_id)
            self.doctor.found(Finding("unrecorded-version", f"{v.name} v{v.version}", f"{digest[:19]}: the lineage "
                                      "database records no such version (a registration killed before it "
                                      "committed)", "delete the version and its logged model"),
                              lambda v=v, m=model_id: self._drop_version(v, m, logged.get(m)))
        return kept

    def _drop_version(self, version, model_id: str | None, logged) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_model_version(version.name, version.version)
        except MlflowException:
            pass
        if model_id:
            self._drop_logged(model_id, logged.artifact_location if logged is not None else None)

    def missing_versions(self, rows: dict[str, Model], versions: dict) -> None:
        for row in rows.values():
            if row.mlflow_version is None:
                continue  # registered without a mirror (library use)
            if (registered_name(row.name), row.mlflow_version) in versions:
                continue
            self.doctor.found(Finding("missing-version", row.digest, f"{row.name} v{row.mlflow_version} is not in "
                                      "MLflow", "register it again from the store"),
                              lambda r=row: self._register_again(r))

    def _register_again(self, row: Model) -> None:
        info = self.registry.get(row.id)
        path = Path(info.store_path)
        if not self.registry.store.has(info.digest):
            raise RuntimeError("its stored copy is missing too: restore it first (`mergeyard doctor` lists it)")
        parents = self.registry.parents_of(info)
        tags = {"mergeyard.digest": info.digest, "mergeyard.source": info.source_uri, "mergeyard.kind": info.kind,
                "mergeyard.parents": ",".join(p.digest for e, p in parents if e.role in ("base", "candidate"))}
        mirrored = self.mirror.register_model(info.name, path, tags, serving=serving_spec(path, self._heads(parents)),
                                              files=[f["path"] for f in info.files],
                                              sha256={f["path"]: f["sha256"] for f in info.files if f.get("sha256")})
        with self.registry.Session.begin() as s:
            model = s.get(Model, row.id)
            model.mlflow_model_id, model.mlflow_version = mirrored.model_id, mirrored.version
        row.mlflow_model_id, row.mlflow_version = mirrored.model_id, mirrored.version

    def _heads(self, parents) -> list[ServedHead]:
        """The heads a merged model served (its wrapped candidates'), as the merge registered them."""
        heads = []
        for edge, parent in parents:
            if edge.role == "candidate" and (edge.details or {}).get("wrapper") is not None:
                found = self.registry.head_of(parent)
                if found is not None:
                    heads.append(ServedHead(parent.name, Path(found[0].store_path), edge.details["wrapper"].rstrip(".")))
        return heads

    def aliases(self, rows: dict[str, Model]) -> None:
        """Every alias the log has moved, and every alias MLflow shows on a mergeyard model's name (a promotion
        killed before its commit moved one the log never recorded)."""
        names = {registered_name(r.name): r.name for r in rows.values()}
        shown = {(names[m.name], alias) for m in _pages(self.client.search_registered_models)
                 if m.name in names for alias in (m.aliases or {})}
        from registry.audit_chain import log_name, verify

        with self.registry.Session() as s:
            logged = set(s.execute(select(PromotionEvent.model_name, PromotionEvent.alias).distinct()).all())
            # MLflow lost its witness (a lost store) and the chain verifies in itself: the witness is published
            # again from it (audit_witness), so the aliases follow it too; a chain that does not verify moves none
            unwitnessed = self.mirror.audit_head(log_name(self.registry)) is None and not verify(s).chain_broken
            for name, alias in sorted(logged | shown):
                try:
                    holder = self.registry.alias_holder(s, name, alias, unwitnessed)
                except Exception as exc:  # noqa: BLE001  (a tampered event: `audit --verify` says which)
                    self.doctor.found(Finding("alias", f"{name}@{alias}", " ".join(str(exc).splitlines()), ""))
                    continue
                expected = s.get(Model, holder).mlflow_version if holder is not None else None
                shown = self.mirror.alias_version(name, alias)
                if shown == expected:
                    continue
                action = f"point it at version {expected}" if expected else "remove it from MLflow"
                self.doctor.found(Finding("alias", f"{name}@{alias}", f"the audit log says version {expected}, "
                                          f"MLflow says {shown}", action),
                                  lambda n=name, a=alias, v=expected: self._set_alias(n, a, v))

    def _set_alias(self, name: str, alias: str, version: str | None) -> None:
        if version is None:
            self.mirror.delete_alias(name, alias)
        else:
            self.mirror.set_alias(name, alias, version)

    def open_runs(self) -> None:
        from mlflow.entities import RunStatus

        for run in _pages(self.client.search_runs, experiment_ids=[self.mirror.experiment_id],
                          filter_string="attributes.status = 'RUNNING'"):
            owner = run.data.tags.get(OWNER_TAG)
            if run.info.status != RunStatus.to_string(RunStatus.RUNNING) or not owner_gone(owner):
                continue
            self.doctor.found(Finding("open-mlflow-run", run.info.run_id, f"{run.info.run_name}: RUNNING, left by "
                                      f"process {owner}", "close it as KILLED"),
                              lambda r=run.info.run_id: self.mirror.close_run(r, "KILLED"))

    def _missing_witness(self, chain: str) -> None:
        """MLflow lost the witness (a lost store): published again from the log, but only if the whole chain
        verifies; a chain that does not is `audit --verify`'s to report, not the doctor's to bless."""
        from registry.audit_chain import verify

        if self.mirror.audit_head(chain) is not None:
            return
        with self.registry.Session() as s:
            report = verify(s)
        if report.events == 0:
            return
        if report.chain_broken:
            self.doctor.found(Finding("audit-witness", "the audit log", "MLflow keeps no witness and the chain "
                                      "fails verification: see `mergeyard audit --verify`", ""))
            return
        self.doctor.found(Finding("audit-witness", f"event {report.head_seq}", "MLflow keeps no witness of the "
                                  f"log's {report.events} events (the chain verifies)", "publish the log's head"),
                          lambda: self.mirror.set_audit_head(chain, report.head_seq, report.head))

    def audit_witness(self) -> None:
        from registry.audit_chain import log_name

        chain = log_name(self.registry)
        pending = self.mirror.audit_pending(chain)
        if pending is None:
            self._missing_witness(chain)
            return
        with self.registry.Session() as s:
            last = s.scalar(select(PromotionEvent).order_by(PromotionEvent.seq.desc().nulls_last()).limit(1))
        committed = last is not None and (last.seq, last.event_hash) == pending

        def settle() -> None:
            if committed:
                self.mirror.set_audit_head(chain, *pending)
            self.mirror.clear_audit_pending(chain)

        self.doctor.found(Finding("audit-witness", f"event {pending[0]}", "the promotion " + (
            "committed; the witness was not moved" if committed else "never committed"),
            "move the witness to it" if committed else "drop the pending head"), settle)


def _model_id(version) -> str | None:
    """The logged model behind a version (searches leave `model_id` empty; the source names it)."""
    source = version.source or ""
    return version.model_id or (source.removeprefix("models:/") if source.startswith("models:/") else None)
