"""Image classification by a transformers vision model (ViT, ConvNeXt, ...) with one linear head per task.

The `image-classification` family of a suite file whose tasks name heads
(fine-tunes saved by `AutoModelForImageClassification`); inputs are image files,
prepared by the model's own image processor.
"""

from __future__ import annotations

import torch

from evaluation.families.task_heads import TaskHeadsFamily
from merging.checkpoints.companions import PREPROCESSOR_FILES


def open_image(item):
    """A path, raw bytes or a hub dataset cell ({bytes, path}) as an RGB PIL image."""
    import io

    from PIL import Image

    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return Image.open(io.BytesIO(item)).convert("RGB")
    return Image.open(item).convert("RGB")


class VisionHeadsFamily(TaskHeadsFamily):
    name = "image-classification"
    auto_class = "AutoModelForImageClassification"
    preprocessing_files = PREPROCESSOR_FILES
    preprocessor_class, preprocessor_name = "AutoImageProcessor", "image processor (preprocessor_config.json)"
    input_column = "image"

    def prepare(self, raw, device: torch.device) -> dict:
        pixels = self.preprocessor(images=[open_image(x) for x in raw], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(device)}
