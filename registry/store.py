"""The content-addressed model store: MERGEYARD_HOME/store/<digest>/.

The registry keeps its own copy of every model's safetensors, so lineage can
always be rebuilt from digests even after the original files are gone. A copy
lands in a temporary directory and is renamed into place whole; two processes
storing the same digest at once both end with the one complete copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from merging.atomic import move_into_place, temp_beside
from merging.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from merging.companions import MODEL_FILES

MANIFEST = "mergeyard-files.json"
# Beside the tensors: the index, what makes the model loadable (config, generation config, tokenizer,
# preprocessor config), a model card and provenance.
COMPANIONS = (INDEX_NAME, *MODEL_FILES, "README.md", "mergeyard.json")


def _copy_hashing(src: Path, dst: Path) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(8 << 20):
            h.update(block)
            fout.write(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def has(self, digest: str) -> bool:
        return (self.path_for(digest) / MANIFEST).is_file()

    def files(self, digest: str) -> list[dict]:
        return json.loads((self.path_for(digest) / MANIFEST).read_text())

    def put(self, ckpt: Checkpoint, digest: str) -> tuple[Path, list[dict], bool]:
        """Copy a checkpoint in (if not there yet). Returns (path, files with sha256, created)."""
        final = self.path_for(digest)
        if self.has(digest):
            return final, self.files(digest), False
        tmp = temp_beside(final)
        try:
            files = []
            single = len(ckpt.files) == 1 and not (ckpt.files[0].parent / INDEX_NAME).is_file()
            for src in ckpt.files:
                name = SINGLE_NAME if single else src.name
                files.append({"path": name, **_copy_hashing(src, tmp / name)})
            source_dir = ckpt.files[0].parent
            for extra in COMPANIONS:
                if (source_dir / extra).is_file() and not (single and extra == INDEX_NAME):
                    files.append({"path": extra, **_copy_hashing(source_dir / extra, tmp / extra)})
            (tmp / MANIFEST).write_text(json.dumps(files, indent=2))
            if not move_into_place(tmp, final):  # another process stored the same digest first
                return final, self.files(digest), False
            return final, files, True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self, digest: str) -> None:
        """Undo a `put` whose registration failed (only ever for a copy this process created)."""
        shutil.rmtree(self.path_for(digest), ignore_errors=True)
