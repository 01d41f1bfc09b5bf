"""The offline benchmark zoo: procedural image tasks, a small CLIP, its fine-tunes."""
