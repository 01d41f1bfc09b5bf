"""LoRA adapters in the registry: a PEFT adapter directory ingested on its base, in mergeyard's stored form
(merging/checkpoints/lora.py: A, B and scaling per adapted weight), so the digest covers every number that decides it."""

from __future__ import annotations

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.lora import ADAPTER_ARCHITECTURE, check_against_base, read_peft
from registry.errors import RegistryError
from registry.names import derived_name
from registry.model_info import ModelInfo


class LoraAdapters:
    """The registry's method for adapters (a mixin over its `scratch_checkpoint`, `scan`, `find_digest`,
    `declare_base` and `register`)."""

    def ingest_adapter(self, src, name: str | None, base_info: ModelInfo | None) -> tuple[ModelInfo, bool]:
        """A resolved PEFT LoRA adapter source, with its declared base: checked against the base's weights, then
        always copied into the store (it is converted, and small); the same adapter again is the same row."""
        label = src.uri.removeprefix("file://")
        if base_info is None:
            raise RegistryError(f"{label}: a LoRA adapter is a task vector on its base model: give the base "
                                "(`--base`, a registered model or a path)")
        with self.scratch_checkpoint(read_peft(src.path), "adapter", {"mergeyard.kind": "lora"}) as ckpt:
            check_against_base(ckpt, Checkpoint(base_info.store_path), label, f"{base_info.name} ({base_info.digest[:19]})")
            digest, checksums = self.scan(ckpt)
            existing = self.find_digest(digest)
            if existing is not None:
                return self.declare_base(existing, base_info), False
            return self.register(ckpt, digest, kind="ingested", name=name or derived_name(src.default_name), source_uri=src.uri,
                                 revision=src.revision, architecture=ADAPTER_ARCHITECTURE, base_model_id=base_info.id,
                                 tensor_checksums=checksums)
