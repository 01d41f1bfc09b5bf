"""Relevance scores against hand-worked cosines, and the `score` command on the small zoo."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import MergeyardError
from merging.algorithms.relevance import gradient_alignment, task_vector_cosine


def write(tmp_path, name, sd):
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return Checkpoint(path)


def test_gradient_alignment_is_the_per_tensor_cosine_of_descent_and_task_vector(tmp_path):
    theta0 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
    g = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}
    base = write(tmp_path, "base", theta0)
    # along −g everywhere: +1 on both tensors
    downhill = write(tmp_path, "down", {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([[0.0, 1.0], [1.0, -3.0]])})
    # uphill on a, orthogonal on b: (-1 + 0) / 2
    mixed = write(tmp_path, "mixed", {"a": torch.tensor([4.0, 2.0]), "b": torch.tensor([[5.0, 1.0], [1.0, 0.0]])})
    # τ_a = (-1, 1) → cos 45° with (−1, 0) = 1/√2; τ_b = 0 → no evidence, 0
    diagonal = write(tmp_path, "diag", {"a": torch.tensor([0.0, 3.0]), "b": theta0["b"].clone()})
    scores = gradient_alignment(g, base, [downhill, mixed, diagonal])
    assert scores.names == ("a", "b")
    expected = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [1 / math.sqrt(2), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(scores.per_tensor, expected)
    assert scores.summary == pytest.approx([1.0, -0.5, 1 / (2 * math.sqrt(2))])


def test_gradient_alignment_refuses_a_candidate_of_another_architecture(tmp_path):
    base = write(tmp_path, "base", {"a": torch.zeros(2)})
    other = write(tmp_path, "other", {"z": torch.zeros(2)})
    with pytest.raises(MergeyardError, match="has no tensor 'a'"):
        gradient_alignment({"a": torch.ones(2)}, base, [other])


def test_task_vector_cosine_over_the_whole_model(tmp_path):
    base = write(tmp_path, "base", {"a": torch.zeros(2), "b": torch.zeros(1), "ids": torch.arange(3)})
    target = write(tmp_path, "t", {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0]), "ids": torch.arange(3)})
    same_dir = write(tmp_path, "s", {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([2.0]), "ids": torch.arange(3)})
    ortho = write(tmp_path, "o", {"a": torch.tensor([0.0, 5.0]), "b": torch.tensor([0.0]), "ids": torch.arange(3)})
    half = write(tmp_path, "h", {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0]), "ids": torch.arange(3)})
    assert task_vector_cosine(base, target, [same_dir, ortho, half, base]) == pytest.approx([1.0, 0.0, 0.0, 0.0])


def test_score_command_ranks_each_tasks_own_fine_tune_first(small_zoo):
    from flows.cli import app
    from flows.registry_access import open_registry

    zoo, manifest, _ = small_zoo
    candidates = [str(zoo / "finetuned" / t) for t in manifest["finetuned"]]
    for task in manifest["finetuned"]:
        result = CliRunner().invoke(app, ["score", *candidates, "--suite", f"zoo:{task}", "--base", str(zoo / "base"),
                                          "--json"])
        assert result.exit_code == 0, result.output
        ranked = json.loads(result.stdout)
        assert ranked[0]["name"] == task and ranked[0]["relevance"] > 0
    recorded = open_registry().scores(f"zoo:{task}", "gradient")
    assert recorded == {r["digest"]: pytest.approx(r["relevance"]) for r in ranked}


def test_score_command_data_free_with_a_reference(small_zoo):
    from flows.cli import app
    from flows.registry_access import open_registry

    zoo, manifest, _ = small_zoo
    candidates = [str(zoo / "finetuned" / t) for t in manifest["finetuned"]]
    result = CliRunner().invoke(app, ["score", *candidates, "--suite", "my-private-suite", "--base", str(zoo / "base"),
                                      "--reference", str(zoo / "finetuned" / "textures"), "--json"])
    assert result.exit_code == 0, result.output
    ranked = json.loads(result.stdout)
    assert ranked[0]["name"] == "textures" and ranked[0]["relevance"] == pytest.approx(1.0)
    assert all(-1 <= r["relevance"] < 1 for r in ranked[1:])
    assert open_registry().scores("my-private-suite", "task_vector_cosine") == {r["digest"]: pytest.approx(r["relevance"]) for r in ranked}
