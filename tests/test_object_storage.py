"""Checkpoints on object storage (moto's S3 server standing in for a bucket): read by ranged GETs of exactly the
bytes a tensor needs, merged in one process or on a Dask cluster to the digest of the same files on disk, and a
worker that cannot reach the bucket ends the merge with one line naming it."""

from __future__ import annotations

import os
from functools import partial

import pytest

from conftest import random_family, save_checkpoint
from merging.engine import run_merge
from merging.errors import CheckpointError
from merging.recipes.recipe import parse_recipe

pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A moto S3 server with a bucket holding a base and two fine-tunes (sharded), and the same files on disk."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    import boto3
    import s3fs

    boto3.client("s3").create_bucket(Bucket="models")
    tmp = tmp_path_factory.mktemp("bucket")
    shapes = {f"model.layers.{i}.w": (48, 40) for i in range(6)} | {"model.embed_tokens.weight": (50, 40),
                                                                    "model.norm.weight": (40,)}
    base, fts = random_family(2, seed=12, shapes=shapes)
    local = [save_checkpoint(sd, tmp / n, "sharded") for n, sd in [("base", base), ("a", fts[0]), ("b", fts[1])]]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for p in local:
        fs.put(str(p), f"models/{p.name}", recursive=True)
    yield {"local": local, "remote": [f"s3://models/{p.name}" for p in local], "tmp": tmp, "endpoint": f"http://{host}:{port}"}
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def recipe(method: str, paths: list[str], **params) -> dict:
    return {"method": method, "base": str(paths[0]), "models": [str(p) for p in paths[1:]], "parameters": params}


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"lambda": 0.4}), ("ties", {"density": 0.3}),
                                            ("tsv", {})])
def test_a_merge_from_the_bucket_is_the_merge_from_disk(bucket, method, params, tmp_path):
    remote = run_merge(parse_recipe(recipe(method, bucket["remote"], **params)), tmp_path / "remote",
                       chunk_elems=500)  # row chunks: ranged reads of part of a tensor
    local = run_merge(parse_recipe(recipe(method, bucket["local"], **params)), tmp_path / "local", chunk_elems=500)
    assert remote.digest == local.digest
    assert remote.plan.units[0].reads[0].file.startswith("model-")  # named relative to the checkpoint, as on disk


def test_ranged_reads_fetch_only_the_bytes_asked_for(bucket):
    import torch

    from merging.checkpoints.checkpoint import Checkpoint
    from merging.checkpoints.remote import open_checkpoint

    remote, local = open_checkpoint(bucket["remote"][1]), Checkpoint(bucket["local"][1])
    name = "model.embed_tokens.weight"
    assert torch.equal(remote.read(name, slice(7, 19)), local.read(name, slice(7, 19)))
    calls = []
    fs = remote._file_of[name].fs
    original = fs.cat_file
    fs.cat_file = lambda path, start=None, end=None, **kw: calls.append((start, end)) or original(path, start=start, end=end, **kw)
    try:
        remote.read(name, slice(7, 19))
    finally:
        fs.cat_file = original
    entry = remote.entries[name]
    assert calls == [(entry.start + 7 * 40 * 4, entry.start + 19 * 40 * 4)]


def test_on_a_dask_cluster_from_the_bucket(bucket, tmp_path):
    from merging.engine.dask_executor import DaskExecutor, connect

    client = connect("local", workers=2)  # workers spawned with this process's environment: the endpoint
    try:
        data = recipe("ties", bucket["remote"], density=0.3)
        dask = run_merge(parse_recipe(data), tmp_path / "dask", executor_factory=partial(DaskExecutor, client=client))
        local = run_merge(parse_recipe(recipe("ties", bucket["local"], density=0.3)), tmp_path / "local")
        assert dask.digest == local.digest
        assert len(dask.details["executor"]["workers"]) == 2
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def test_a_worker_that_cannot_reach_the_bucket_is_named(bucket, tmp_path):
    from distributed import Client, LocalCluster

    from merging.engine.dask_executor import DaskExecutor

    # the driver reaches the bucket (it reads the headers); the workers are told a port nothing listens on
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                           env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"})
    client = Client(cluster)
    try:
        worker = next(iter(client.nthreads()))
        with pytest.raises(CheckpointError) as caught:
            run_merge(parse_recipe(recipe("task_arithmetic", bucket["remote"])), tmp_path / "never",
                      executor_factory=partial(DaskExecutor, client=client))
        message = str(caught.value)
        assert f"worker {worker}" in message and "s3://models/" in message and "\n" not in message
        assert not (tmp_path / "never").exists()
    finally:
        client.close()
        cluster.close()


def test_ingest_and_merge_from_the_bucket_by_uri(bucket, cli):
    import json

    import yaml

    from merging.checkpoints.digest import checkpoint_digest

    ingested = json.loads(cli("ingest", bucket["remote"][1], "--name", "from-bucket", "--json").stdout)
    assert ingested["digest"] == checkpoint_digest(bucket["local"][1])
    recipe = bucket["tmp"] / "bucket-recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for_cli(bucket["remote"])))
    merged = json.loads(cli("merge", recipe, "--name", "merged-from-bucket", "--json").stdout)
    local = run_merge(parse_recipe(recipe_for_cli(bucket["local"])), bucket["tmp"] / "cli-local")
    assert merged["digest"] == local.digest
    missing = cli("ingest", "s3://models/nothing-here", ok=False)
    assert missing.exit_code != 0 and "s3://models/nothing-here" in missing.output


def recipe_for_cli(paths):
    return recipe("task_arithmetic", [str(p) for p in paths], **{"lambda": 0.5})
