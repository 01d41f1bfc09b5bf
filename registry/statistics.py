"""Statistics artifacts (a model's diagonal Fisher or Gram matrices, `mergeyard measure`) in the registry.

A safetensors file whose metadata says `mergeyard.statistics` is registered as kind `statistics` and linked to
the model it measures (`mergeyard.model`, a digest) by a `measured` edge naming the suite digest, the tasks and
the budget; `ingest` does the same for a file a model's author published.
"""

from __future__ import annotations

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.digest import checkpoint_digest
from registry.model_info import ModelInfo, Parent

METADATA_KIND = "mergeyard.statistics"  # what marks a safetensors file as statistics (and of which model)


def is_statistics(ckpt: Checkpoint) -> bool:
    return METADATA_KIND in ckpt.metadata


class StatisticsArtifacts:
    """The registry's method for statistics artifacts (a mixin over its `find_digest` and `register`)."""

    def register_statistics(self, ckpt: Checkpoint, name: str, source_uri: str) -> tuple[ModelInfo, bool]:
        """A statistics artifact (measured here, or ingested from its author's file) as a registered model of kind
        `statistics`, linked to the model it measures where that model is registered."""
        digest = checkpoint_digest(ckpt)
        existing = self.find_digest(digest)
        if existing is not None:
            return existing, False
        meta = ckpt.metadata
        of = self.find_digest(meta.get("mergeyard.model", ""))
        details = {"stat": meta.get(METADATA_KIND), "suite": meta.get("mergeyard.suite"),
                   "suite_digest": meta.get("mergeyard.suite_digest"), "data_digest": meta.get("mergeyard.data_digest"),
                   "tasks": meta.get("mergeyard.tasks", "").split(",") if meta.get("mergeyard.tasks") else None,
                   "budget": int(meta["mergeyard.budget"]) if meta.get("mergeyard.budget") else None}
        return self.register(ckpt, digest, kind="statistics", name=name, source_uri=source_uri,
                             parents=[Parent(of, "measured", details=details)] if of else [], mirror=False)
