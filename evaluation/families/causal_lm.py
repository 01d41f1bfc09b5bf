"""`causal-lm`: a transformers `AutoModelForCausalLM` scored by log-likelihood, batched.

    choice_accuracy   multiple choice, as lm-evaluation-harness scores it: each choice's summed log-likelihood
                      as a continuation of the context; the highest wins (loss: cross-entropy over the choices)
    perplexity        exp of the mean token negative log-likelihood of each text (truncated to `max_length`)

The whole model is what is merged (no heads); tied input and output embeddings
stay tied (a checkpoint saved with them tied holds the embedding once).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Mapping

import torch
from torch.func import functional_call

from evaluation.families.base import Family, Outputs, Runner, as_dirs, first_with
from evaluation.families.hf_names import checkpoint_names
from evaluation.families.task_heads import files_digest
from merging.checkpoints.alignment import state_entries
from merging.checkpoints.companions import TOKENIZER_FILES
from merging.errors import MergeyardError


class CausalLMRunner(Runner):
    def __init__(self, family: "CausalLMFamily", device: torch.device):
        super().__init__(family, device)
        self.model = family.create_model().to(device).eval()
        # by checkpoint name (what merges hold; a tied output embedding is saved once) → module name
        self.to_module = checkpoint_names(self.model)
        state = self.model.state_dict()
        self.entries = state_entries({k: state[v] for k, v in self.to_module.items()})
        self.names = tuple(k for k, spec in self.entries.items() if spec.is_float)
        self.batch_size = family.batch_size
        self.tokenizer = family.tokenizer

    def shared_module(self) -> torch.nn.Module:
        return self.model

    def module_to_checkpoint(self) -> dict[str, str]:
        return {module: checkpoint for checkpoint, module in self.to_module.items()}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prepare(self, task, raw) -> dict:
        bos = self.tokenizer.bos_token_id
        start = [bos] if bos is not None else []
        limit = self.family.max_length
        if task.metric == "perplexity":
            rows = [(start + self._encode(str(text)))[:limit] for text in raw]
            return {"kind": "perplexity", "rows": rows}
        sequences, spans, counts = [], [], []
        for context, choices in raw:
            prompt = start + self._encode(str(context))
            counts.append(len(choices))
            for choice in choices:
                continuation = self._encode(str(choice))
                seq = (prompt + continuation)[-limit:]  # keep the continuation whole, cut the context's start
                spans.append((max(1, len(seq) - len(continuation)), len(seq)))
                sequences.append(seq)
        return {"kind": "choice", "rows": sequences, "spans": spans, "counts": counts}

    def _token_logprobs(self, rows: list[list[int]], state) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(token t | tokens < t) for every row (right-padded), and the padding mask."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        weights = {self.to_module[k]: v for k, v in state.items() if k in self.to_module}
        logits = functional_call(self.model, weights, args=(), kwargs={"input_ids": ids, "attention_mask": mask},
                                 strict=False).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # position t scores token t + 1
        return picked, mask[:, 1:]

    def outputs(self, task, batch, state: Mapping[str, torch.Tensor]) -> Outputs:
        picked, mask = self._token_logprobs(batch["rows"], state)
        if batch["kind"] == "perplexity":
            return Outputs(nll=-(picked * mask).sum(-1), tokens=mask.sum(-1))
        per_choice = []
        for i, (begin, end) in enumerate(batch["spans"]):
            per_choice.append(picked[i, begin - 1:end - 1].sum())  # tokens begin..end-1, predicted one step earlier
        width = max(batch["counts"])
        scores = torch.full((len(batch["counts"]), width), float("-inf"), device=self.device)
        k = 0
        for row, count in enumerate(batch["counts"]):
            scores[row, :count] = torch.stack(per_choice[k:k + count])
            k += count
        return Outputs(scores=scores)


class CausalLMFamily(Family):
    name = "causal-lm"
    metrics = ("choice_accuracy", "perplexity")

    def __init__(self, heads: dict | None = None, model_dir: Path | list[Path] | None = None,
                 explicit_model: bool = False, options: dict | None = None):
        self.model_dirs = as_dirs(model_dir)
        self.explicit_model = explicit_model
        self.options = dict(options or {})
        self.batch_size = int(self.options.get("batch_size", 8))
        self.max_length = int(self.options.get("max_length", 512))

    def _directory(self, names: tuple[str, ...], what: str) -> Path:
        found = first_with(self.model_dirs, names)
        if found is None:
            raise MergeyardError(f"a causal-lm suite needs the model's {what}: give `model:` in the suite file, or "
                                 "evaluate a registered model whose files (or its base's) include it")
        return found

    @cached_property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self._directory(("config.json",), "config.json"))

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self._directory(TOKENIZER_FILES, "tokenizer"))

    def create_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(self.config)

    def identity(self) -> dict:
        model = files_digest(self.model_dirs[0]) if self.explicit_model and self.model_dirs else "lineage"
        return {"family": self.name, "model": model, "options": self.options}

    def with_model_dirs(self, directories: list[Path]) -> "CausalLMFamily":
        if self.explicit_model:
            return self
        return CausalLMFamily(None, directories, False, self.options)

    def runner(self, device: torch.device) -> CausalLMRunner:
        return CausalLMRunner(self, device)
