"""A tamper-evident audit log: every promotion event hash-chained to the one before; `audit --verify` names the
first event edited, inserted, removed or reordered by direct SQL with the triggers dropped; a hand-written
`promoted` row moves no alias; production takes a gate. On SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json

import pytest
import yaml
from sqlalchemy import text

from conftest import random_family, save_checkpoint

APPEND_ONLY_TRIGGERS = {  # what an owner of the database can drop: the append-only guards, the sealing rule
    "sqlite": ["DROP TRIGGER promotion_events_no_update", "DROP TRIGGER promotion_events_no_delete",
               "DROP TRIGGER promotion_events_sealed"],
    "postgresql": ["DROP TRIGGER promotion_events_append_only ON promotion_events",
                   *(f"ALTER TABLE promotion_events ALTER COLUMN {c} DROP NOT NULL" for c in ("seq", "prev_hash",
                                                                                              "event_hash"))],
}


@pytest.fixture
def log(cli, tmp_path, database_url, monkeypatch):
    """Four events: product promoted to staging and production, a refusal, another model to staging."""
    monkeypatch.setenv("MERGEYARD_DATABASE_URL", database_url)
    from flows.settings import get_settings

    get_settings.cache_clear()
    cli("db", "upgrade")
    base, models = random_family(2, seed=7)
    for name, sd in (("base", base), ("a", models[0]), ("b", models[1])):
        save_checkpoint(sd, tmp_path / f"{name}.safetensors")
    for name in ("a", "b"):
        cli("ingest", tmp_path / f"{name}.safetensors", "--name", "product")
    empty = tmp_path / "gate.yaml"  # a gate with one rule every file-ingested model passes
    empty.write_text("lineage: {allowed_sources: [file]}\n")
    first = cli("models", "list", "--json")
    ids = [m["digest"] for m in json.loads(first.stdout)]
    cli("promote", ids[0], "--to", "staging")
    cli("promote", ids[0], "--to", "production", "--gate", empty)
    cli("promote", ids[1], "--to", "production", ok=False)  # no gate: refused, recorded
    cli("promote", ids[1], "--to", "staging")
    from flows.registry_access import open_registry

    registry = open_registry()
    yield registry, ids
    registry.close()


def verify(cli) -> tuple[int, str]:
    result = cli("audit", "--verify", ok=False)
    return result.exit_code, result.stderr.strip()


def tamper(registry, *statements: str) -> None:
    with registry.engine.begin() as conn:
        for sql in APPEND_ONLY_TRIGGERS[registry.engine.dialect.name]:
            conn.execute(text(sql))
        for sql in statements:
            conn.execute(text(sql))


def test_production_takes_a_gate_or_an_explicit_no_gate(log, cli):
    registry, ids = log
    events = json.loads(cli("audit", "--json").stdout)
    refusal = events[2]
    assert refusal["decision"] == "refused" and refusal["checks"][0]["rule"] == "a gate for production"
    assert registry.resolve("product@production").digest == ids[0]  # the refusal moved nothing
    cli("promote", ids[1], "--to", "production", "--no-gate", "--reason", "hotfix")
    assert registry.resolve("product@production").digest == ids[1]
    assert json.loads(cli("audit", "--json").stdout)[-1]["no_gate"] is True
    assert verify(cli)[0] == 0


def test_an_untouched_log_verifies_and_its_head_is_mlflows_witness(log, cli):
    code, _ = verify(cli)
    assert code == 0
    report = json.loads(cli("audit", "--verify", "--json").stdout)
    assert report["ok"] and report["events"] == 4 and report["head_seq"] == 4
    assert cli("audit", "--head").stdout.strip() == f"4:{report['head']}"
    registry, _ = log
    from registry.audit_chain import log_name

    assert registry.mirror.audit_head(log_name(registry)) == (4, report["head"])


@pytest.mark.tampers
def test_an_edited_event_is_named(log, cli):
    registry, _ = log
    tamper(registry, "UPDATE promotion_events SET actor = 'mallory' WHERE seq = 2")
    code, message = verify(cli)
    assert code == 5 and "seq 2" in message and "edited" in message


HAND_WRITTEN = ("INSERT INTO promotion_events (model_id, model_name, alias, decision, gate, actor, created_at) "
                "VALUES (:m, 'product', 'production', 'promoted', :g, 'mallory', CURRENT_TIMESTAMP)")


def test_the_database_refuses_an_event_outside_the_chain(log):
    registry, ids = log
    with pytest.raises(Exception, match="audit chain|null value|NOT NULL"):
        with registry.engine.begin() as conn:
            other = conn.execute(text("SELECT id FROM models WHERE digest = :d"), {"d": ids[1]}).scalar()
            conn.execute(text(HAND_WRITTEN), {"m": other, "g": "{}"})


@pytest.mark.tampers
def test_a_hand_written_promotion_is_named_moves_no_alias_and_wedges_nothing(log, cli):
    """The defects as reported: an INSERT with invented gate checks moved production; one with NULL seq and hash
    then locked the alias for good. Written past the database's own refusal (by its owner), it is reported by
    `audit --verify`, read by nothing, and promotions go on."""
    registry, ids = log
    tamper(registry)
    with registry.engine.begin() as conn:
        other = conn.execute(text("SELECT id FROM models WHERE digest = :d"), {"d": ids[1]}).scalar()
        conn.execute(text(HAND_WRITTEN), {"m": other, "g": json.dumps({"checks": [{"rule": "made up", "passed": True}]})})
    code, message = verify(cli)
    assert code == 5 and "unchained" in message
    assert json.loads(cli("lineage", "product@production", "--format", "json").stdout)["model"] == ids[0]
    cli("promote", ids[1], "--to", "production", "--no-gate", "--reason", "after the forgery")
    assert registry.resolve("product@production").digest == ids[1]


@pytest.mark.tampers
def test_a_deleted_event_is_named(log, cli):
    registry, _ = log
    tamper(registry, "DELETE FROM promotion_events WHERE seq = 2")
    code, message = verify(cli)
    assert code == 5 and "seq 3" in message and "removed" in message


@pytest.mark.tampers
def test_a_deleted_last_event_is_caught_by_the_witness(log, cli):
    registry, _ = log
    tamper(registry, "DELETE FROM promotion_events WHERE seq = 4")
    code, message = verify(cli)
    assert code == 5 and "removed" in message and "cut from its end" in message
    # nor does an alias resolve from it (it would name the holder before the deleted event)
    refused = cli("export", "product@staging", "--out", registry.config.scratch.parent.parent / "out", ok=False)
    assert refused.exit_code == 1 and "does not verify" in refused.stderr and "witness" in refused.stderr


@pytest.mark.tampers
def test_reordered_events_are_named(log, cli):
    registry, _ = log
    tamper(registry, "UPDATE promotion_events SET id = 1000 WHERE seq = 2")  # the second event moved to the end
    code, message = verify(cli)
    assert code == 5 and "reordered" in message


@pytest.mark.tampers
def test_a_chain_rewritten_end_to_end_is_caught_by_the_witness(log, cli):
    """Whoever can write the database can recompute every hash; MLflow's witness of the head still differs."""
    from registry.audit_chain import rechain

    registry, _ = log
    tamper(registry, "UPDATE promotion_events SET actor = 'mallory' WHERE seq = 1")  # even the first event
    with registry.engine.begin() as conn:
        assert rechain(conn) == 4  # every hash recomputed over the edited content
    code, message = verify(cli)
    assert code == 5 and "witness" in message and "rewritten" in message
    refused = cli("lineage", "product@production", ok=False)
    assert refused.exit_code == 1 and "does not verify" in refused.stderr


@pytest.mark.tampers
def test_a_forged_event_chained_onto_the_log_resolves_nothing_and_doctor_will_not_follow_it(log, cli):
    """A correctly chained INSERT (whoever can write the database can compute the hashes) points production at
    another model, and MLflow's alias is moved to match: the witness still holds the old head, so the alias is not
    resolved and `doctor --fix` does not move MLflow's alias on the log's word."""
    from sqlalchemy.orm import Session

    from registry.audit_chain import seal
    from registry.schema import PromotionEvent

    registry, ids = log
    tamper(registry)
    with Session(registry.engine) as s, s.begin():
        forged = PromotionEvent(model_id=registry.resolve(ids[1]).id, model_name="product", alias="production",
                                decision="promoted", gate={"checks": []}, actor="mallory", reason="forged")
        seal(s, forged)
        s.add(forged)
    refused = cli("lineage", "product@production", ok=False)
    assert refused.exit_code == 1 and "does not verify" in refused.stderr
    report = json.loads(cli("doctor", "--json", ok=False).stdout)
    aliases = [f for f in report["findings"] if f["kind"] == "alias"]
    assert aliases and all("does not verify" in f["detail"] and not f["action"] for f in aliases)
    fixed = cli("doctor", "--fix", ok=False)
    assert fixed.exit_code == 6
    assert registry.mirror.alias_version("product", "production") == registry.resolve(ids[0]).mlflow_version


def test_on_postgresql_the_application_role_cannot_change_the_log(pg_cluster, tmp_path):
    """The migration creates mergeyard_app: INSERT and SELECT on the log, never UPDATE or DELETE (even with the
    triggers gone, which only the owner can drop); never a model's digest or where its bytes are."""
    import uuid

    from sqlalchemy import create_engine

    from registry.db import make_engine, upgrade

    database = pg_cluster.create_database()
    upgrade(make_engine(pg_cluster.url(database)))
    admin = create_engine(pg_cluster.url(database))
    user = f"alice_{uuid.uuid4().hex[:8]}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE ROLE {user} LOGIN"))
        conn.execute(text(f"GRANT mergeyard_app TO {user}"))
        conn.execute(text("INSERT INTO models (digest, name, kind, source_uri, files, num_params, dtype, size_bytes, "
                          "store_path, created_at) VALUES ('sha256:x', 'm', 'ingested', 'file://x', '[]', 1, 'F32', 4, "
                          "'store/x', now())"))
    app = create_engine(pg_cluster.url(database, user=user))
    with app.begin() as conn:  # what the registry itself changes of a model stays open to it
        conn.execute(text("UPDATE models SET mlflow_version = '2', files = '[]'"))
    with app.begin() as conn:  # it may append (what mergeyard does), with a place in the chain
        conn.execute(text("INSERT INTO promotion_events (model_id, model_name, alias, decision, gate, actor, created_at, "
                          "seq, prev_hash, event_hash) SELECT id, 'm', 'staging', 'refused', '{}', current_user, now(), "
                          "1, repeat('0', 64), repeat('1', 64) FROM models"))
        assert conn.execute(text("SELECT count(*) FROM promotion_events")).scalar() == 1
    with pytest.raises(Exception, match="not-null"):  # a row outside the chain: refused by the database itself
        with app.begin() as conn:
            conn.execute(text("INSERT INTO promotion_events (model_id, model_name, alias, decision, gate, actor, "
                              "created_at) SELECT id, 'm', 'staging', 'refused', '{}', current_user, now() FROM models"))
    for statement in ("UPDATE promotion_events SET actor = 'mallory'", "DELETE FROM promotion_events",
                      "UPDATE models SET store_path = 'elsewhere'", "UPDATE models SET digest = 'sha256:y'",
                      "DROP TRIGGER promotion_events_append_only ON promotion_events",
                      "UPDATE alembic_version SET version_num = '0001'"):
        with pytest.raises(Exception, match="permission denied|must be owner"):
            with app.begin() as conn:
                conn.execute(text(statement))
    admin.dispose()
    app.dispose()
    pg_cluster.drop_database(database)


def test_events_written_before_the_chain_existed_are_chained_by_the_migration(tmp_path):
    from sqlalchemy import create_engine

    from registry.db import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(make_engine(url), "0003")
    old = create_engine(url)
    with old.begin() as conn:
        conn.execute(text("INSERT INTO models (digest, name, kind, source_uri, files, num_params, dtype, size_bytes, "
                          "store_path, created_at) VALUES ('sha256:x', 'm', 'ingested', 'file://x', '[]', 1, 'F32', 4, "
                          "'store/x', CURRENT_TIMESTAMP)"))
        for alias in ("staging", "production"):
            conn.execute(text("INSERT INTO promotion_events (model_id, model_name, alias, decision, gate, actor, "
                              "created_at) VALUES (1, 'm', :a, 'promoted', '{}', 'ci', CURRENT_TIMESTAMP)"), {"a": alias})
    old.dispose()
    engine = make_engine(url)
    upgrade(engine)
    from sqlalchemy.orm import Session

    from registry.audit_chain import verify

    with Session(engine) as s:
        report = verify(s)
    assert report.ok and report.events == 2 and report.head_seq == 2
