"""Model sources: a URI in, safetensors on local disk out.

    file:///abs/path  or a plain path   a .safetensors file or a checkpoint directory
    hf://org/name[@revision]            Hugging Face Hub, via huggingface_hub.snapshot_download
                                        (honours HF_HUB_OFFLINE and the hub cache)
    open_clip://ARCH[/PRETRAINED]       open_clip.create_model; no PRETRAINED: random init, seed 0
    mlflow://NAME/VERSION, mlflow://NAME@ALIAS
                                        a registered model version's artifacts
    s3://BUCKET/PREFIX (gs://, az://)   a checkpoint in a bucket, via fsspec (s3fs: AWS_* variables,
                                        AWS_ENDPOINT_URL for MinIO)

Identifiers are checked before anything is fetched: no '..', no absolute
paths, only the characters each service allows.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from merging.checkpoints.companions import MODEL_FILES
from merging.references import parse_ref
from registry.errors import SourceError
from registry.serving import checkpoint_dir
from merging.runtime.processes import owner_token

_HF_REVISION = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]*$")
_OPEN_CLIP_PART = re.compile(r"^[A-Za-z0-9_.@:-]+$")
_MLFLOW_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "adapter_config.json", *MODEL_FILES]


@dataclass
class ResolvedSource:
    uri: str  # canonical form, recorded as the model's source
    path: Path  # a .safetensors file or a checkpoint directory
    revision: str | None
    architecture: str | None
    default_name: str


def _no_traversal(uri: str, part: str) -> None:
    if ".." in re.split(r"[/\\]", part) or part.startswith("/"):
        raise SourceError(f"{uri}: path traversal ('..' or an absolute path) is not allowed here")


def _architecture_from_config(directory: Path) -> str | None:
    config = directory / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    archs = data.get("architectures") or []
    return archs[0] if archs else data.get("model_type")


def scheme_of(uri: str) -> str:
    return parse_ref(uri).scheme or "file"


@dataclass(frozen=True)
class SourceContext:
    """What resolvers may use: the hub cache, a scratch folder for what they materialise, MLflow's store."""

    hf_cache: Path | None = None
    scratch: Path | None = None
    mlflow_tracking_uri: str | None = None


@contextmanager
def _resolve_file(uri: str, context: SourceContext) -> Iterator[ResolvedSource]:
    path = parse_ref(uri).path
    if path is None or not path.exists():
        raise SourceError(f"{uri}: no such file or directory")
    path = path.resolve()
    directory = path if path.is_dir() else path.parent
    name = path.name.removesuffix(".safetensors") if path.is_file() else path.name
    if path.is_file() and path.name == "model.safetensors":
        name = path.parent.name
    yield ResolvedSource(f"file://{path}", path, None, _architecture_from_config(directory), name)


@contextmanager
def _resolve_hf_source(uri: str, context: SourceContext) -> Iterator[ResolvedSource]:
    yield _resolve_hf(uri, context.hf_cache)


@contextmanager
def _resolve_open_clip_source(uri: str, context: SourceContext) -> Iterator[ResolvedSource]:
    with _resolve_open_clip(uri, context.hf_cache, context.scratch) as resolved:
        yield resolved


@contextmanager
def _resolve_mlflow_source(uri: str, context: SourceContext) -> Iterator[ResolvedSource]:
    with _resolve_mlflow(uri, context.scratch, context.mlflow_tracking_uri) as resolved:
        yield resolved


@contextmanager
def _resolve_object_store(uri: str, context: SourceContext) -> Iterator[ResolvedSource]:
    """A checkpoint in a bucket (s3://BUCKET/PREFIX, gs://, az://): its safetensors (one file, or shards with their
    index) and loadability files streamed to scratch; the revision is the objects' ETags, hashed."""
    import hashlib

    from merging.checkpoints.companions import companion_files
    from merging.checkpoints.remote import remote_files, remote_path
    from merging.errors import CheckpointError

    _no_traversal(uri, uri.split("://", 1)[1])
    try:
        root = remote_path(uri)
        files = remote_files(root)
        folder = root if root.is_dir() else root.parent
        extra = companion_files(folder) if root.is_dir() else []
    except CheckpointError as exc:
        raise SourceError(str(exc)) from None
    index = [folder / "model.safetensors.index.json"] if len(files) > 1 else []
    with _scratch_dir(context.scratch) as tmp:
        tags = hashlib.sha256()
        for remote in files + index + extra:
            try:
                remote.fs.get_file(remote.path, str(tmp / remote.name))  # streamed in blocks, never whole in memory
                tags.update(f"{remote.name}:{remote.fs.info(remote.path).get('ETag', '')}".encode())
            except Exception as exc:
                raise SourceError(f"{remote}: cannot download ({type(exc).__name__}: {exc})") from None
        path = tmp if root.is_dir() else tmp / files[0].name
        name = root.name.removesuffix(".safetensors") if not root.is_dir() else root.name
        yield ResolvedSource(uri.rstrip("/"), path, tags.hexdigest()[:16], _architecture_from_config(tmp), name)


# scheme → resolver: (uri, context) → a context manager yielding local safetensors. A new scheme is one entry.
RESOLVERS: dict[str, Callable[[str, SourceContext], ContextManager[ResolvedSource]]] = {
    "file": _resolve_file,
    "hf": _resolve_hf_source,
    "open_clip": _resolve_open_clip_source,
    "mlflow": _resolve_mlflow_source,
    "s3": _resolve_object_store,
    "gs": _resolve_object_store,
    "az": _resolve_object_store,
}


@contextmanager
def resolve_source(uri: str, *, hf_cache: Path | None = None, scratch: Path | None = None,
                   mlflow_tracking_uri: str | None = None) -> Iterator[ResolvedSource]:
    """Resolve `uri` (a path or a source URI) to local safetensors; temporary files are removed on exit."""
    ref = parse_ref(uri)
    resolver = RESOLVERS.get(ref.scheme or "")
    if resolver is None:
        known = ", ".join(f"{s}://" for s in RESOLVERS)
        raise SourceError(f"{uri}: unknown source scheme {ref.scheme!r}; use a path or {known}" if ref.scheme else
                          f"{uri}: no such file or directory, and not a source URI ({known})")
    with resolver(uri, SourceContext(hf_cache, scratch, mlflow_tracking_uri)) as resolved:
        yield resolved


def _resolve_hf(uri: str, hf_cache: Path | None) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import validate_repo_id

    rest = uri[len("hf://"):]
    repo, _, revision = rest.partition("@")
    try:
        validate_repo_id(repo)  # the hub's own rules for a repo id
    except HFValidationError as exc:
        raise SourceError(f"{uri}: expected hf://ORG/NAME[@REVISION] ({str(exc).splitlines()[0]})") from None
    if "/" not in repo or ".." in repo:
        raise SourceError(f"{uri}: expected hf://ORG/NAME[@REVISION]")
    if revision and (not _HF_REVISION.match(revision) or ".." in revision.split("/")):
        raise SourceError(f"{uri}: revision {revision!r} is not a valid branch, tag or commit")
    try:
        snapshot = Path(snapshot_download(repo, revision=revision or None, cache_dir=hf_cache,
                                          allow_patterns=SAFETENSORS_PATTERNS))
    except LocalEntryNotFoundError:
        raise SourceError(
            f"{uri}: not in the local hub cache and the hub cannot be reached (HF_HUB_OFFLINE is honoured); "
            "download it once with network access or point MERGEYARD_HF_CACHE at a cache that has it"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise SourceError(f"{uri}: {type(exc).__name__}: check the repository name and revision") from None
    except HfHubHTTPError as exc:
        raise SourceError(f"{uri}: hub request failed ({exc})") from None
    if not list(snapshot.glob("*.safetensors")):
        raise SourceError(f"{uri}: the snapshot holds no .safetensors files (pickled weights are not ingested)")
    commit = snapshot.name
    canonical = f"hf://{repo}@{commit}"
    return ResolvedSource(canonical, snapshot, commit, _architecture_from_config(snapshot), repo)


@contextmanager
def _scratch_dir(scratch: Path | None) -> Iterator[Path]:
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"source-{owner_token()}-", dir=scratch))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _resolve_open_clip(uri: str, hf_cache: Path | None, scratch: Path | None) -> Iterator[ResolvedSource]:
    rest = uri[len("open_clip://"):]
    arch, _, pretrained = rest.partition("/")
    if not _OPEN_CLIP_PART.match(arch) or (pretrained and not _OPEN_CLIP_PART.match(pretrained)):
        raise SourceError(f"{uri}: expected open_clip://ARCH[/PRETRAINED] (letters, digits, _ . - @ :)")
    import open_clip
    import torch
    from safetensors.torch import save_file

    if arch not in open_clip.list_models() and not arch.startswith("hf-hub:"):
        raise SourceError(f"{uri}: open_clip has no model {arch!r}; see open_clip.list_models()")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # no pretrained tag: the same random init every time
            model = open_clip.create_model(arch, pretrained=pretrained or None,
                                           cache_dir=str(hf_cache) if hf_cache else None)
    except (RuntimeError, ValueError) as exc:
        raise SourceError(f"{uri}: open_clip could not create it ({str(exc).splitlines()[0]})") from None
    with _scratch_dir(scratch) as tmp:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        canonical = f"open_clip://{arch}" + (f"/{pretrained}" if pretrained else "")
        yield ResolvedSource(canonical, tmp, pretrained or "random-init-seed-0", f"open_clip/{arch}",
                             f"open_clip-{arch}" + (f"-{pretrained}" if pretrained else ""))


@contextmanager
def _resolve_mlflow(uri: str, scratch: Path | None, tracking_uri: str | None) -> Iterator[ResolvedSource]:
    rest = uri[len("mlflow://"):]
    if "@" in rest:
        name, _, alias = rest.partition("@")
        version = None
    else:
        name, _, version = rest.partition("/")
        alias = None
    if not _MLFLOW_NAME.match(name) or not ((version and version.isdigit()) or (alias and _MLFLOW_NAME.match(alias))):
        raise SourceError(f"{uri}: expected mlflow://NAME/VERSION or mlflow://NAME@ALIAS")
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise SourceError(f"{uri}: not in the MLflow registry ({exc.message.splitlines()[0]})") from None
    with _scratch_dir(scratch) as tmp:
        # The version's source is a logged model (models:/m-...); MLflow resolves that name through the process-wide
        # tracking URI, not this client's, so fetch the logged model's own artifact location through this client.
        source = mv.source
        try:
            if source.startswith("models:/m-"):
                source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                             tracking_uri=tracking_uri))
        except MlflowException as exc:
            raise SourceError(f"{uri}: MLflow could not fetch the version's files ({exc.message.splitlines()[0]})") from None
        # one of ours is a pyfunc model whose data holds the checkpoint (and its tasks' heads beside it)
        directory = checkpoint_dir(local)
        if directory is None:
            found = sorted(local.rglob("*.safetensors"))
            if not found:
                raise SourceError(f"{uri}: the model version's artifacts hold no .safetensors files")
            directory = found[0].parent
        yield ResolvedSource(f"mlflow://{name}/{mv.version}", directory, f"{name}/{mv.version}",
                             _architecture_from_config(directory), name)
