"""`text-classification`: a transformers encoder (BERT, MiniLM, RoBERTa, ...) with one head per task.

Inputs are a task's texts, tokenized by the model's own tokenizer (truncated to
`max_length`, 128 unless the suite's `options` say otherwise).
"""

from __future__ import annotations

import torch

from evaluation.families.task_heads import TaskHeadsFamily
from merging.checkpoints.companions import TOKENIZER_FILES


class TextClassificationFamily(TaskHeadsFamily):
    name = "text-classification"
    auto_class = "AutoModelForSequenceClassification"
    preprocessing_files = TOKENIZER_FILES
    preprocessor_class, preprocessor_name = "AutoTokenizer", "tokenizer"
    input_column = "text"

    def prepare(self, raw, device: torch.device) -> dict:
        texts = [str(t) for t in raw]
        batch = self.preprocessor(texts, padding=True, truncation=True, max_length=int(self.options.get("max_length", 128)),
                               return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()}
