"""How flows run: Prefect's environment, Dask task runners, serving the pipeline on a schedule.

With no Prefect configuration, mergeyard keeps Prefect's state under
MERGEYARD_HOME/prefect (ephemeral API, run history, results) so that a fresh
checkout writes nothing outside `./.mergeyard/`. A team sets PREFECT_API_URL
and gets its own server instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from merging.errors import MergeyardError
from flows.settings import Settings


def configure_prefect(settings: Settings) -> None:
    """Defaults for Prefect, set before it is imported; explicit PREFECT_* settings win."""
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault("PREFECT_HOME", str((Path(settings.home) / "prefect").resolve()))
        # Prefect makes its home without parents; a MERGEYARD_HOME not yet on disk left the ephemeral
        # server without a database and the run failed with a startup timeout
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # the ephemeral server's first start applies its migrations: 12-25 s measured on 2 cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def prefect_api_url() -> str | None:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def dask_runner(address: str | None):
    """A DaskTaskRunner on `address`, or on a two-worker LocalCluster.

    Worker processes need a Prefect API to report to; in ephemeral mode each
    would start its own server (35 s measured), so the local cluster uses
    threads there and processes when an API is configured.
    """
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    processes = prefect_api_url() is not None
    return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": processes,
                                          "dashboard_address": None})


def with_runner(flow, dask: str | None):
    """The flow on Dask when asked (`dask` is an address, or 'local' for a LocalCluster)."""
    if dask is None:
        return flow
    return flow.with_options(task_runner=dask_runner(None if dask == "local" else dask))


def check_can_serve(config) -> None:
    """A schedule, and a Prefect server that answers: without them `serve` would block on nothing or retry
    the deployment's registration for minutes before failing with a transport traceback."""
    if config.schedule is None:
        raise MergeyardError(f"pipeline {config.name!r} has no schedule: add `schedule: {{cron: '0 2 * * *'}}`")
    url = prefect_api_url()
    if url is None:
        raise MergeyardError("serving a schedule needs a Prefect server: start one (`prefect server start`, or the "
                             "docker-compose stack) and set PREFECT_API_URL")
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    key = api.key.get_secret_value() if api.key else None
    auth = api.auth_string.get_secret_value() if api.auth_string else None
    with SyncPrefectClient(url, api_key=key, auth_string=auth) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise MergeyardError(f"no Prefect server answers at PREFECT_API_URL={url} ({type(failure).__name__}: "
                             f"{failure}); start it or fix the URL")


def serve_pipeline(config, env, dask: str | None = None, limit: int | None = None,
                   preflight: Callable[[], None] | None = None, announce: Callable[[dict], None] | None = None) -> None:
    """Serve the pipeline as a deployment named after it, on the config's cron schedule (blocks). `preflight`
    runs once the server answers and before anything is deployed; `announce` gets what is about to be served."""
    from flows.pipeline import pipeline_flow

    check_can_serve(config)
    if preflight is not None:
        preflight()
    if announce is not None:
        announce({"deployment": f"mergeyard-pipeline/{config.name}", "cron": config.schedule.cron,
                  "timezone": config.schedule.timezone, "api": prefect_api_url()})
    flow = with_runner(pipeline_flow, dask)
    flow.serve(name=config.name, schedules=[config.schedule.prefect_schedule()],
               parameters={"config": config.model_dump(mode="json"), "env": env.model_dump(mode="json")},
               description=f"mergeyard pipeline {config.name}: merge the candidates, evaluate on {config.suite}, "
                           f"promote the best through the gate", limit=limit)
