"""The team stack: docker-compose.yml's structure, and the same services brought up natively.

No Docker engine runs here, so the compose file is checked for what `docker
compose` would need (healthchecks, start order, every variable defined), and
the integration test starts what the services run — PostgreSQL, an
S3-compatible store with its bucket (moto's server standing in for MinIO),
`mlflow server --serve-artifacts` into that bucket, `prefect server start` on
PostgreSQL — as local
processes on loopback ports, runs the pipeline against them (on a Dask
cluster), serves it as a scheduled deployment, triggers it, and stops every
process it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_start_in_order_behind_healthchecks():
    services = compose()["services"]
    assert {"postgres", "minio", "minio-bucket", "mlflow", "prefect-server", "migrate", "worker"} <= set(services)
    long_running = [n for n, s in services.items() if s.get("restart") != "no"]
    for name in long_running:
        if name != "worker":
            assert "healthcheck" in services[name], f"{name} has no healthcheck"
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            expected = "service_healthy" if services[dep].get("restart") != "no" else "service_completed_successfully"
            assert cond == {"condition": expected}, f"{name} → {dep}: {cond}"
    assert services["worker"]["depends_on"].keys() == {"migrate", "mlflow", "prefect-server"}
    assert services["mlflow"]["depends_on"].keys() == {"postgres", "minio-bucket"}


def test_compose_wires_the_databases_bucket_and_worker():
    services = compose()["services"]
    mlflow_cmd = services["mlflow"]["command"]
    assert "--serve-artifacts" in mlflow_cmd and "s3://${MLFLOW_BUCKET}" in mlflow_cmd
    assert "@postgres:5432/mlflow" in mlflow_cmd
    assert "mc mb --ignore-existing store/$${MLFLOW_BUCKET}" in services["minio-bucket"]["entrypoint"]
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    worker = services["worker"]
    assert worker["command"].startswith("mergeyard serve /pipelines/")
    env = worker["environment"]
    assert env["MERGEYARD_DATABASE_URL"].endswith("@postgres:5432/mergeyard")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert services["migrate"]["command"] == "mergeyard db upgrade"
    init = (ROOT / "docker" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow;" in init and "CREATE DATABASE prefect;" in init
    assert (ROOT / "docker" / "Dockerfile").is_file()
    assert services["mlflow"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_every_compose_variable_is_in_env_example_and_the_served_pipeline_is_valid():
    from flows.config import load_pipeline

    text = (ROOT / "docker-compose.yml").read_text()
    used = {m for m in re.findall(r"(?<!\$)\$\{([A-Z_]+)(?::-[^}]*)?\}", text)}
    defaults = set(re.findall(r"\$\{([A-Z_]+):-", text))
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used - defaults <= set(example), f"undefined: {sorted(used - defaults - set(example))}"
    config = load_pipeline(ROOT / "pipelines" / example["MERGEYARD_PIPELINE"])
    assert config.schedule is not None and config.candidate_globs


# ---- integration: the same services as local processes ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def team_stack(pg_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    dbs = {n: pg_cluster.create_database() for n in ("lineage", "mlflow", "prefect")}
    mlflow_port, prefect_port, s3_port = _free_port(), _free_port(), _free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MERGEYARD_", "AWS_"))}
    s3_env = {"AWS_ACCESS_KEY_ID": "mergeyard", "AWS_SECRET_ACCESS_KEY": "mergeyard-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    procs = []
    try:
        # the S3-compatible artifact store (MinIO in docker-compose; moto's server here), bucket created at start
        s3_log = root / "s3.log"
        procs.append(subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                                      env={**base_env, **s3_env}, cwd=root, stdout=s3_log.open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        s3_url = f"http://127.0.0.1:{s3_port}"
        _wait_healthy(f"{s3_url}/moto-api/", procs[-1], s3_log)
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_url, **{k.lower(): v for k, v in s3_env.items() if k != "AWS_DEFAULT_REGION"},
                          region_name="us-east-1")
        s3.create_bucket(Bucket="mlflow")
        mlflow_log = root / "mlflow.log"
        procs.append(subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", pg_cluster.url(dbs["mlflow"]), "--serve-artifacts",
             "--artifacts-destination", "s3://mlflow/artifacts"],
            env={**base_env, **s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            cwd=root, stdout=mlflow_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        prefect_log = root / "prefect.log"
        procs.append(subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env={**base_env, "PREFECT_HOME": str(root / "prefect-server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "PREFECT_API_DATABASE_CONNECTION_URL":
                     pg_cluster.url(dbs["prefect"]).replace("postgresql+psycopg", "postgresql+asyncpg")},
            cwd=root, stdout=prefect_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", procs[1], mlflow_log)
        _wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health", procs[2], prefect_log)
        yield {
            "root": root, "procs": procs, "s3": s3,
            "lineage_url": pg_cluster.url(dbs["lineage"]),
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "prefect": f"http://127.0.0.1:{prefect_port}/api",
            "env": {**base_env, "HF_HUB_OFFLINE": "1", "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                    "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                    "MERGEYARD_DATABASE_URL": pg_cluster.url(dbs["lineage"]),
                    "MERGEYARD_HOME": str(root / "worker-home"), "PREFECT_HOME": str(root / "worker-prefect"),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
        }
    finally:
        for p in procs:
            _stop(p)
        for name in dbs.values():
            pg_cluster.drop_database(name)


def mergeyard(stack, *args, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=stack["env"], cwd=stack["root"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_pipeline_runs_and_serves_on_postgres_mlflow_server_and_prefect_server(team_stack, small_zoo):
    import mlflow
    from sqlalchemy import create_engine, text

    stack = team_stack
    zoo, _, _ = small_zoo
    pipeline = stack["root"] / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "team-nightly", "suite": "ta8-mini", "tasks": ["digits", "letters", "colours"],
        "base": str(zoo / "base"), "candidate_globs": [str(zoo / "finetuned" / "*")],
        "score": {"top_k": 3},
        "merges": [{"method": "task_arithmetic", "parameters": {"lambda": 0.3}}, {"method": "average"}],
        "promotion": {"alias": "production", "gate": {"required_suites": [
            {"suite": "ta8-mini", "tasks": ["digits", "letters", "colours"]}], "min_average": 0.6}},
        "schedule": {"cron": "0 2 * * *", "timezone": "UTC"},
    }))

    upgraded = mergeyard(stack, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    ran = mergeyard(stack, "run", str(pipeline), "--dask", "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout[ran.stdout.index("{"):])
    assert report["promotion"]["decision"] == "promoted"
    best = report["best"]

    # MLflow (through the server, artifacts proxied) holds the promoted version under the alias
    client = mlflow.MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])
    version = client.get_model_version_by_alias("team-nightly", "production")
    assert version.tags["mergeyard.digest"] == best
    stored = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.startswith("artifacts/") and k.endswith(".safetensors") for k in stored)  # proxied into the bucket

    # the lineage lives in PostgreSQL
    engine = create_engine(stack["lineage_url"])
    with engine.connect() as conn:
        merged = conn.execute(text("select count(*) from models where kind = 'merged'")).scalar()
        events = conn.execute(text("select count(*) from promotion_events")).scalar()
        runs = conn.execute(text("select count(*) from merge_runs where status = 'succeeded'")).scalar()
    assert (merged, events, runs) == (2, 1, 2)

    # the Prefect server saw the flow run, its tasks (on Dask workers) and the artifacts
    api = httpx.Client(base_url=stack["prefect"], timeout=20)
    flow_runs = api.post("/flow_runs/filter", json={}).json()
    assert [r["state"]["type"] for r in flow_runs] == ["COMPLETED"]
    task_runs = api.post("/task_runs/filter", json={}).json()
    assert sum(t["name"].startswith("merge team-nightly") for t in task_runs) == 2
    artifacts = api.post("/artifacts/filter", json={}).json()
    assert {a["key"] for a in artifacts} >= {"team-nightly-summary", "team-nightly-average"}

    # served as a deployment on the config's schedule; a triggered run completes and changes nothing
    serve_log = stack["root"] / "serve.log"
    served = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(pipeline)], env=stack["env"],
                              cwd=stack["root"], stdout=serve_log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    stack["procs"].append(served)
    try:
        deadline, deployment = time.monotonic() + 120, None
        while deployment is None and time.monotonic() < deadline:
            assert served.poll() is None, serve_log.read_text()[-3000:]
            found = api.get("/deployments/name/mergeyard-pipeline/team-nightly")
            deployment = found.json() if found.status_code == 200 else None
            time.sleep(1)
        assert deployment is not None, serve_log.read_text()[-3000:]
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
        assert deployment["schedules"][0]["schedule"]["timezone"] == "UTC"
        run = api.post(f"/deployments/{deployment['id']}/create_flow_run", json={}).json()
        deadline, state = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            state = api.get(f"/flow_runs/{run['id']}").json()["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
        assert state == "COMPLETED", serve_log.read_text()[-4000:]
    finally:
        _stop(served)
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from promotion_events")).scalar() == 1
        assert conn.execute(text("select count(*) from merge_runs")).scalar() == 2
    engine.dispose()


@pytest.mark.integration
def test_a_map_sweep_runs_on_dask_against_the_team_stack(team_stack, small_zoo):
    """MAP's samples as mapped tasks on Dask workers reporting to the Prefect server, cached in PostgreSQL; the
    front's plot and JSON through the MLflow server into the bucket."""
    from sqlalchemy import create_engine, text

    stack = team_stack
    zoo, _, _ = small_zoo
    candidates = ",".join(str(zoo / "finetuned" / t) for t in ("digits", "letters"))
    ran = mergeyard(stack, "map", "--suite", "ta8-mini", "--tasks", "digits,letters", "--base", str(zoo / "base"),
                    "--candidates", candidates, "--dask", "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout[ran.stdout.index("{"):])
    assert report["newly_evaluated"] == 12 and len(report["points"]) >= 3
    engine = create_engine(stack["lineage_url"])
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from map_samples")).scalar() == 12
        assert conn.execute(text("select real_evaluations from map_fronts where id = :i"), {"i": report["front"]}).scalar() == 12
    engine.dispose()
    api = httpx.Client(base_url=stack["prefect"], timeout=20)
    task_runs = api.post("/task_runs/filter", json={}).json()
    assert sum(t["name"].startswith("sample ") for t in task_runs) == 12
    assert any(a["key"] == f"map-front-{report['front']}" for a in api.post("/artifacts/filter", json={}).json())
    stored = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith(f"front-{report['front']}.png") for k in stored)
    picked = mergeyard(stack, "map", "pick", str(report["front"]), "--prefer", "digits=1,letters=1", "--json")
    assert picked.returncode == 0, picked.stderr[-3000:]
    assert set(json.loads(picked.stdout[picked.stdout.index("{"):])["measured"]) == {"digits", "letters"}
