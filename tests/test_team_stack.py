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
    assert services["worker"]["depends_on"].keys() == {"migrate", "mlflow-worker-user", "prefect-server"}
    assert services["mlflow-worker-user"]["depends_on"].keys() == {"mlflow"}
    assert services["mlflow"]["depends_on"].keys() == {"postgres", "minio-bucket"}


def test_compose_wires_the_databases_bucket_logins_and_worker():
    services = compose()["services"]
    mlflow_cmd = services["mlflow"]["command"]
    assert "--app-name basic-auth" in mlflow_cmd
    assert "--serve-artifacts" in mlflow_cmd and "s3://$${MLFLOW_BUCKET}" in mlflow_cmd
    assert "mlflow:$${MLFLOW_DB_PASSWORD}@postgres:5432/mlflow" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/auth.ini"
    assert "./docker/mlflow-auth.ini:/etc/mlflow/auth.ini:ro" in services["mlflow"]["volumes"]
    bucket = services["minio-bucket"]["entrypoint"]
    assert "mc mb --ignore-existing store/$${MLFLOW_BUCKET}" in bucket and "mc admin user add" in bucket
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "prefect:$${PREFECT_DB_PASSWORD}@postgres:5432/prefect" in services["prefect-server"]["command"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    worker = services["worker"]
    assert "mergeyard_worker:$${MERGEYARD_WORKER_DB_PASSWORD}@postgres:5432/mergeyard" in worker["command"]
    assert 'exec mergeyard serve "/pipelines/$${MERGEYARD_PIPELINE}"' in worker["command"]
    env = worker["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"} <= set(env)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD"} & set(env)  # MLflow proxies S3
    assert "exec mergeyard db upgrade" in services["migrate"]["command"]
    init = (ROOT / "docker" / "postgres-init.sh").read_text()
    assert "CREATE DATABASE mlflow OWNER mlflow" in init and "CREATE DATABASE prefect OWNER prefect" in init
    assert "IN ROLE mergeyard_app" in init
    assert (ROOT / "docker" / "Dockerfile").is_file()
    assert services["mlflow"]["build"]["dockerfile"] == "docker/Dockerfile"


SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY|AUTH_STRING|ROOT_USER")


def test_no_secret_is_written_in_the_compose_file_and_only_the_uis_are_published_on_localhost():
    services = compose()["services"]
    for name, service in services.items():
        for var, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(var):  # from .env, and compose refuses to start without it
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), f"{name}: {var} = {value!r} is written here"
        for text in (service.get("command"), service.get("entrypoint")):
            # a credential in a command line is read from the container's environment at start ($$), never written
            for user_password in re.findall(r"://([^@/\s]+)@", str(text or "")):
                assert re.fullmatch(r"([a-z_]+|\$\$\{[A-Z0-9_]+\}):\$\$\{[A-Z0-9_]+\}", user_password), f"{name}: {user_password}"
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert set(published) == {"mlflow", "prefect-server", "minio"}  # PostgreSQL and the S3 API stay inside
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("${MERGEYARD_BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} beyond localhost"
    assert services["minio"]["ports"] == ["${MERGEYARD_BIND_ADDRESS:-127.0.0.1}:${MINIO_CONSOLE_PORT:-9001}:9001"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert not re.search(r"^\s*(ENV|ARG)\s+\S*(PASSWORD|SECRET|KEY)", dockerfile, re.M | re.I)
    # the example ships no password anyone could leave in place: every one is blank until generated
    filled = [line for line in (ROOT / ".env.example").read_text().splitlines() if not line.startswith("#")
              and re.search(r"PASSWORD|SECRET|AUTH_STRING", line.split("=")[0]) and line.split("=", 1)[1]]
    assert not filled, filled


def test_every_compose_variable_is_in_env_example_and_the_served_pipeline_is_valid():
    from flows.config import load_pipeline

    text = "\n".join(line for line in (ROOT / "docker-compose.yml").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)(?::[-?][^}]*)?\}", text))
    defaults = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+):-", text))
    required = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+):\?", text))
    assert required >= {"POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_S3_SECRET_KEY"}
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


# Every secret the stack holds, as .env would set them; the processes get them only through their environment.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-admin-9f2c", "MLFLOW_DB_PASSWORD": "pg-mlflow-41ad", "PREFECT_DB_PASSWORD": "pg-prefect-7e01",
    "MERGEYARD_WORKER_DB_PASSWORD": "pg-worker-c3b8", "MLFLOW_ADMIN_PASSWORD": "mlflow-admin-55e1",
    "MERGEYARD_MLFLOW_PASSWORD": "mlflow-worker-0d9a", "MLFLOW_FLASK_SECRET_KEY": "flask-8c1f",
    "PREFECT_AUTH_STRING": "mergeyard:prefect-2b6e",
}


def _s3_with_its_own_key(url: str) -> tuple[dict, object]:
    """MinIO's bootstrap (`mc admin user add`, a readwrite policy) on moto's IAM: the first three requests are
    unauthenticated (INITIAL_NO_AUTH_ACTION_COUNT), then every request must be signed by a key that exists."""
    import boto3

    iam = boto3.client("iam", endpoint_url=url, aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
                       region_name="us-east-1")
    iam.create_user(UserName="mlflow")
    iam.put_user_policy(UserName="mlflow", PolicyName="readwrite", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="mlflow")["AccessKey"]
    env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
           "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    s3.create_bucket(Bucket="mlflow")
    return env, s3


def _spawn(procs: list, args: list[str], env: dict, root: Path, name: str) -> Path:
    log = root / f"{name}.log"
    procs.append(subprocess.Popen(args, env=env, cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True))
    return log


@pytest.fixture(scope="module")
def team_stack(tmp_path_factory):
    """docker-compose.yml's services as processes, configured as compose configures them: PostgreSQL with
    password logins, set up by docker/postgres-init.sh; S3 with MLflow's own key; `mlflow server --app-name
    basic-auth` reading docker/mlflow-auth.ini; `prefect server` behind the API auth string; the worker's
    MLflow user made by docker/mlflow-worker-user.py; `mergeyard db upgrade` as the schema's owner."""
    from postgres import Cluster, require_bindir

    bindir = require_bindir()
    root = tmp_path_factory.mktemp("team")
    cluster = Cluster(bindir, password=SECRETS["POSTGRES_PASSWORD"])
    mlflow_port, prefect_port, s3_port = _free_port(), _free_port(), _free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MERGEYARD_", "AWS_"))}
    procs = []
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE DATABASE mergeyard")
        init = subprocess.run(["sh", str(ROOT / "docker" / "postgres-init.sh")], capture_output=True, text=True,
                              env={**base_env, **SECRETS, "PATH": f"{bindir}:{base_env['PATH']}", "PGHOST": "127.0.0.1",
                                   "PGPORT": str(cluster.port), "PGPASSWORD": SECRETS["POSTGRES_PASSWORD"],
                                   "POSTGRES_USER": "postgres", "POSTGRES_DB": "mergeyard"})
        assert init.returncode == 0, init.stderr
        pg = f"127.0.0.1:{cluster.port}"

        s3_log = _spawn(procs, [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                        {**base_env, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, root, "s3")
        s3_url = f"http://127.0.0.1:{s3_port}"
        _wait_healthy(f"{s3_url}/moto-api/", procs[-1], s3_log)
        s3_env, s3 = _s3_with_its_own_key(s3_url)

        auth_ini = root / "mlflow-auth.ini"  # the compose file's, its SQLite file moved off /var/lib
        auth_ini.write_text((ROOT / "docker" / "mlflow-auth.ini").read_text().replace(
            "sqlite:////var/lib/mlflow-auth/basic_auth.db", f"sqlite:///{root / 'mlflow-auth.db'}"))
        mlflow_log = _spawn(procs, [
            str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--workers", "1", "--backend-store-uri", f"postgresql+psycopg://mlflow:{SECRETS['MLFLOW_DB_PASSWORD']}@{pg}/mlflow",
            "--serve-artifacts", "--artifacts-destination", "s3://mlflow/artifacts"],
            {**base_env, **s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
             "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
             "MLFLOW_AUTH_ADMIN_PASSWORD": SECRETS["MLFLOW_ADMIN_PASSWORD"],
             "MLFLOW_FLASK_SERVER_SECRET_KEY": SECRETS["MLFLOW_FLASK_SECRET_KEY"]}, root, "mlflow")
        prefect_log = _spawn(procs, [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                             {**base_env, "PREFECT_HOME": str(root / "prefect-server"),
                              "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                              "PREFECT_SERVER_API_AUTH_STRING": SECRETS["PREFECT_AUTH_STRING"],
                              "PREFECT_API_DATABASE_CONNECTION_URL":
                                  f"postgresql+asyncpg://prefect:{SECRETS['PREFECT_DB_PASSWORD']}@{pg}/prefect"},
                             root, "prefect")
        mlflow_url, prefect_api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        _wait_healthy(f"{mlflow_url}/health", procs[1], mlflow_log)
        _wait_healthy(f"{prefect_api}/health", procs[2], prefect_log)

        worker_user = subprocess.run([sys.executable, str(ROOT / "docker" / "mlflow-worker-user.py")],
                                     capture_output=True, text=True, timeout=120, env={
                                         **base_env, "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_USERNAME": "admin",
                                         "MLFLOW_TRACKING_PASSWORD": SECRETS["MLFLOW_ADMIN_PASSWORD"],
                                         "MERGEYARD_MLFLOW_USER": "mergeyard-worker",
                                         "MERGEYARD_MLFLOW_PASSWORD": SECRETS["MERGEYARD_MLFLOW_PASSWORD"]})
        assert worker_user.returncode == 0, worker_user.stderr[-2000:]
        worker_env = {**base_env, "HF_HUB_OFFLINE": "1", "PREFECT_API_URL": prefect_api,
                      "PREFECT_API_AUTH_STRING": SECRETS["PREFECT_AUTH_STRING"], "MLFLOW_TRACKING_URI": mlflow_url,
                      "MLFLOW_TRACKING_USERNAME": "mergeyard-worker",
                      "MLFLOW_TRACKING_PASSWORD": SECRETS["MERGEYARD_MLFLOW_PASSWORD"],
                      "MERGEYARD_DATABASE_URL":
                          f"postgresql+psycopg://mergeyard_worker:{SECRETS['MERGEYARD_WORKER_DB_PASSWORD']}@{pg}/mergeyard",
                      "MERGEYARD_HOME": str(root / "worker-home"), "PREFECT_HOME": str(root / "worker-prefect"),
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        admin_url = cluster.url("mergeyard")
        migrated = subprocess.run([sys.executable, "-m", "flows.cli", "db", "upgrade"], cwd=root, capture_output=True,
                                  text=True, timeout=300, env={**worker_env, "MERGEYARD_DATABASE_URL": admin_url})
        assert migrated.returncode == 0, migrated.stderr[-2000:]
        yield {
            "root": root, "procs": procs, "s3": s3, "s3_url": s3_url, "pg": pg,
            "lineage_url": admin_url, "mlflow": mlflow_url, "prefect": prefect_api, "env": worker_env,
        }
    finally:
        for p in procs:
            _stop(p)
        cluster.stop()


def _prefect_api(stack) -> httpx.Client:
    user, password = SECRETS["PREFECT_AUTH_STRING"].split(":", 1)
    return httpx.Client(base_url=stack["prefect"], timeout=20, auth=(user, password))


def mergeyard(stack, *args, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=stack["env"], cwd=stack["root"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_every_service_refuses_a_request_without_credentials(team_stack):
    import boto3
    import botocore.exceptions
    import psycopg

    stack = team_stack
    host, port = stack["pg"].split(":")
    # PostgreSQL: no password, a wrong one, and the worker's login on a database that is not its own
    for kwargs in ({"user": "mergeyard_worker", "dbname": "mergeyard"},
                   {"user": "mergeyard_worker", "password": "guess", "dbname": "mergeyard"},
                   {"user": "postgres", "dbname": "mergeyard"},
                   {"user": "mergeyard_worker", "password": SECRETS["MERGEYARD_WORKER_DB_PASSWORD"], "dbname": "mlflow"}):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed|no password|permission denied"):
            psycopg.connect(host=host, port=port, connect_timeout=10, **kwargs).close()
    psycopg.connect(host=host, port=port, user="mergeyard_worker", password=SECRETS["MERGEYARD_WORKER_DB_PASSWORD"],
                    dbname="mergeyard").close()

    # MLflow: the REST API, the artifact proxy and the UI's API all ask for a login; a wrong one is refused
    search = f"{stack['mlflow']}/api/2.0/mlflow/registered-models/search"
    assert httpx.get(search, timeout=20).status_code == 401
    assert httpx.get(search, auth=("mergeyard-worker", "guess"), timeout=20).status_code == 401
    assert httpx.put(f"{stack['mlflow']}/api/2.0/mlflow-artifacts/artifacts/x/evil.bin", content=b"x",
                     timeout=20).status_code == 401
    assert httpx.get(search, auth=("mergeyard-worker", SECRETS["MERGEYARD_MLFLOW_PASSWORD"]), timeout=20).status_code == 200
    # the worker is an ordinary user: it cannot make users
    made = httpx.post(f"{stack['mlflow']}/api/2.0/mlflow/users/create", json={"username": "eve", "password": "x"},
                      auth=("mergeyard-worker", SECRETS["MERGEYARD_MLFLOW_PASSWORD"]), timeout=20)
    assert made.status_code == 403

    # Prefect: every API route but the health probe needs the auth string
    assert httpx.post(f"{stack['prefect']}/flow_runs/filter", json={}, timeout=20).status_code == 401
    assert httpx.post(f"{stack['prefect']}/flow_runs/filter", json={}, auth=("mergeyard", "guess"),
                      timeout=20).status_code == 401
    assert _prefect_api(stack).post("/flow_runs/filter", json={}).status_code == 200

    # S3: unsigned requests and unknown or wrong keys are refused, and nothing is written
    stack["s3"].put_object(Bucket="mlflow", Key="private.bin", Body=b"weights")
    unsigned = httpx.get(f"{stack['s3_url']}/mlflow/private.bin", timeout=20)
    assert unsigned.status_code == 403 and b"weights" not in unsigned.content
    listing = httpx.get(f"{stack['s3_url']}/mlflow", timeout=20)  # moto answers 500 here where MinIO says 403
    assert listing.status_code >= 400 and b"private.bin" not in listing.content
    assert httpx.put(f"{stack['s3_url']}/mlflow/unsigned.bin", content=b"x", timeout=20).status_code >= 400
    for key, secret in (("mergeyard", "mergeyard-secret"), (stack["s3"]._request_signer._credentials.access_key, "wrong")):
        anyone = boto3.client("s3", endpoint_url=stack["s3_url"], aws_access_key_id=key, aws_secret_access_key=secret,
                              region_name="us-east-1")
        with pytest.raises(botocore.exceptions.ClientError, match="InvalidAccessKeyId|SignatureDoesNotMatch"):
            anyone.put_object(Bucket="mlflow", Key="forged.bin", Body=b"x")
    keys = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert "unsigned.bin" not in keys and "forged.bin" not in keys
    stack["s3"].delete_object(Bucket="mlflow", Key="private.bin")



@pytest.mark.integration
def test_without_its_mlflow_login_mergeyard_stops_with_one_line_and_registers_nothing(team_stack, small_zoo):
    from sqlalchemy import create_engine, text

    stack = team_stack
    zoo, _, _ = small_zoo
    env = {k: v for k, v in stack["env"].items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    store = Path(env["MERGEYARD_HOME"]) / "store"
    stored_before = sorted(store.glob("*")) if store.exists() else []
    ran = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", str(zoo / "base"), "--name", "no-login"],
                         env=env, cwd=stack["root"], capture_output=True, text=True, timeout=300)
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert ran.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), ran.stderr[-3000:]
    assert "401" in lines[0] or "credentials" in lines[0].lower() or "unauthorized" in lines[0].lower(), lines[0]
    assert (sorted(store.glob("*")) if store.exists() else []) == stored_before  # no stored copy left behind
    engine = create_engine(stack["lineage_url"])
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from models where name = 'no-login'")).scalar() == 0
    engine.dispose()


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

    ran = mergeyard(stack, "run", str(pipeline), "--dask", "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout[ran.stdout.index("{"):])
    assert report["promotion"]["decision"] == "promoted"
    best = report["best"]

    # MLflow (through the server, artifacts proxied) holds the promoted version under the alias
    os.environ.update(MLFLOW_TRACKING_USERNAME="mergeyard-worker", MLFLOW_TRACKING_PASSWORD=SECRETS["MERGEYARD_MLFLOW_PASSWORD"])
    try:
        client = mlflow.MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])
        version = client.get_model_version_by_alias("team-nightly", "production")
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME"), os.environ.pop("MLFLOW_TRACKING_PASSWORD")
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
    api = _prefect_api(stack)
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

    # the worker's own login may append to the audit log, never rewrite it, and the log it wrote verifies
    import psycopg

    host, port = stack["pg"].split(":")
    for statement in ("UPDATE promotion_events SET actor = 'eve'", "DELETE FROM promotion_events",
                      "TRUNCATE promotion_events", "DROP TRIGGER promotion_events_append_only ON promotion_events",
                      "ALTER TABLE promotion_events DISABLE TRIGGER ALL"):
        with psycopg.connect(host=host, port=port, user="mergeyard_worker", dbname="mergeyard",
                             password=SECRETS["MERGEYARD_WORKER_DB_PASSWORD"]) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    verified = mergeyard(stack, "audit", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr[-2000:]


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
    api = _prefect_api(stack)
    task_runs = api.post("/task_runs/filter", json={}).json()
    assert sum(t["name"].startswith("sample ") for t in task_runs) == 12
    assert any(a["key"] == f"map-front-{report['front']}" for a in api.post("/artifacts/filter", json={}).json())
    stored = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith(f"front-{report['front']}.png") for k in stored)
    picked = mergeyard(stack, "map", "pick", str(report["front"]), "--prefer", "digits=1,letters=1", "--json")
    assert picked.returncode == 0, picked.stderr[-3000:]
    assert set(json.loads(picked.stdout[picked.stdout.index("{"):])["measured"]) == {"digits", "letters"}
