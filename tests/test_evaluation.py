"""Suites, the generator, the evaluator and the objectives, checked against hand computations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from evaluation.evaluator import SuiteResult, TaskResult, evaluate_state
from evaluation.families.zero_shot import ZeroShotImageFamily
from evaluation.objectives import FewShotCrossEntropy, PredictionEntropy
from evaluation.paired import paired_difference
from evaluation.suite import Suite, TaskData
from evaluation.zoo.data import Split, make_split
from evaluation.zoo.tasks import TA8_MINI, TASKS
from merging.errors import MergeyardError
from merging.objective import Objective


def test_there_are_at_least_twenty_tasks_and_ta8_mini_is_eight_of_them():
    assert len(TASKS) >= 20 and len(TA8_MINI) == 8 and set(TA8_MINI) <= set(TASKS)


def test_generator_is_deterministic_and_seeded():
    make_split.cache_clear()
    a = make_split("shapes", "test", 3, 0).digest()
    make_split.cache_clear()
    assert make_split("shapes", "test", 3, 0).digest() == a
    assert make_split("shapes", "test", 3, 1).digest() != a
    assert make_split("shapes", "train", 3, 0).digest() != a


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_class_of_every_task_renders_in_both_domains(task):
    split = make_split(task, "test", 2, 5)
    assert split.images.shape == (2 * len(TASKS[task].classes), 32, 32, 3) and split.images.dtype == torch.uint8
    assert sorted(split.labels.tolist()) == sorted(list(range(len(TASKS[task].classes))) * 2)
    pre = make_split(task, "pretrain", 2, 5)
    assert not torch.equal(pre.images, split.images)


class Flat(torch.nn.Module):
    """A linear 'image tower' with weights a test sets by hand."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.proj(x)


def tiny_suite(images: torch.Tensor, labels: torch.Tensor, head: torch.Tensor) -> Suite:
    split = Split("t", "test", images, labels)
    task = TaskData("t", ("a", "b"), head, split, split)
    return Suite("tiny", {"t": task}, ZeroShotImageFamily(Flat, lambda x: x.float()), {"t": 0.8})


def test_evaluator_matches_a_hand_computed_case():
    # inputs are 2-d points; the model is the identity, the head the two axes:
    # predicted class = the larger coordinate (after normalisation).
    images = torch.tensor([[3.0, 1.0], [1.0, 2.0], [2.0, 5.0], [4.0, 0.5]])
    labels = torch.tensor([0, 1, 0, 0])  # the third is wrong: 3 of 4 correct
    suite = tiny_suite(images, labels, torch.eye(2))
    result = evaluate_state({"proj.weight": torch.eye(2)}, suite, batch_size=3)
    task = result.tasks[0]
    assert task.accuracy == 0.75 and task.samples == 4
    assert task.hits.tolist() == [True, True, False, True]  # across the batch boundary, in the split's order
    assert "hits" not in result.as_dict()["tasks"][0]  # the JSON report stays per task
    assert task.normalized_accuracy == pytest.approx(0.75 / 0.8)
    # loss: cross-entropy of 100·x/|x| against the labels, by hand
    expected = 0.0
    for (x, y), label in zip(images.tolist(), labels.tolist()):
        n = math.hypot(x, y)
        z = [100 * x / n, 100 * y / n]
        expected += math.log(math.exp(z[0] - max(z)) + math.exp(z[1] - max(z))) + max(z) - z[label]
    assert task.loss == pytest.approx(expected / 4, rel=1e-5)
    # a suite scores at its model's own logit scale: the loss changes, the winning class does not
    cooler = dataclasses.replace(suite, family=suite.family.with_scale(2.0))
    expected = 0.0
    for (x, y), label in zip(images.tolist(), labels.tolist()):
        z = [2 * x / math.hypot(x, y), 2 * y / math.hypot(x, y)]
        expected -= z[label] - math.log(math.exp(z[0]) + math.exp(z[1]))
    other = evaluate_state({"proj.weight": torch.eye(2)}, cooler).tasks[0]
    assert other.loss == pytest.approx(expected / 4, rel=1e-5) and other.hits.tolist() == task.hits.tolist()
    # and so do the objectives of data-informed merges (here the few-shot budget is the test split)
    assert FewShotCrossEntropy(cooler, samples_per_task=4).loss({"proj.weight": torch.eye(2)}) == pytest.approx(other.loss, rel=1e-5)
    assert cooler.digest != suite.digest
    with pytest.raises(Exception, match="does not fit"):
        evaluate_state({"other.weight": torch.eye(2)}, suite)


def _result(digest: str, **hits: list[int]) -> SuiteResult:
    tasks = [TaskResult(t, sum(h) / len(h), 0.0, len(h), hits=torch.tensor(h, dtype=torch.bool))
             for t, h in hits.items()]
    return SuiteResult("s", digest, tasks)


def test_paired_difference_matches_a_hand_worked_case():
    # task x: b gains images 1 and 2, loses image 3 -> diffs (0, 1, 1, -1): mean 1/4,
    #   sample variance (1/16 + 9/16 + 9/16 + 25/16) / 3 = 11/12
    # task y: b gains image 0 -> diffs (1, 0): mean 1/2, sample variance 1/2
    a = _result("d", x=[1, 0, 0, 1], y=[0, 1])
    b = _result("d", x=[1, 1, 1, 0], y=[1, 1])
    d = paired_difference(a, b)
    assert d.difference == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert d.difference == pytest.approx(b.average_accuracy - a.average_accuracy)
    assert d.standard_error == pytest.approx(math.sqrt((11 / 12) / 4 + (1 / 2) / 2) / 2)
    assert (d.discordant, d.samples) == (4, 6)
    assert str(d) == "+37.50 ± 34.61"
    assert paired_difference(a, a).standard_error == 0.0
    with pytest.raises(MergeyardError, match="different suites"):
        paired_difference(a, _result("other", x=[1, 1, 1, 0], y=[1, 1]))
    with pytest.raises(MergeyardError, match="different tasks"):
        paired_difference(a, _result("d", x=[1, 1, 1, 0]))


@pytest.mark.parametrize("objective_cls", [FewShotCrossEntropy, PredictionEntropy])
def test_objective_gradients_match_finite_differences(objective_cls):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 2, generator=g, dtype=torch.float64).float()
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    suite = tiny_suite(images, labels, torch.nn.functional.normalize(torch.randn(2, 2, generator=g), dim=-1))
    objective = objective_cls(suite, samples_per_task=6)
    assert isinstance(objective, Objective) and objective.names == ("proj.weight",)
    # 100× logits make the loss steep; a small weight scale keeps finite differences meaningful
    state = {"proj.weight": torch.tensor([[0.3, -0.2], [0.1, 0.4]])}
    loss, grads = objective.loss_and_grad(state)
    assert loss == pytest.approx(objective.loss(state), rel=1e-6)
    eps = 1e-3
    for i in range(2):
        for j in range(2):
            plus = {"proj.weight": state["proj.weight"].clone()}
            minus = {"proj.weight": state["proj.weight"].clone()}
            plus["proj.weight"][i, j] += eps
            minus["proj.weight"][i, j] -= eps
            numeric = (objective.loss(plus) - objective.loss(minus)) / (2 * eps)
            assert grads["proj.weight"][i, j].item() == pytest.approx(numeric, rel=2e-2, abs=2e-2)


def test_suite_digest_covers_data_and_heads():
    images = torch.randint(0, 255, (4, 2), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])
    a = tiny_suite(images, labels, torch.eye(2))
    assert a.digest == tiny_suite(images, labels, torch.eye(2)).digest
    assert a.digest != tiny_suite(images, labels, torch.eye(2).flip(0)).digest
    assert a.digest != tiny_suite(images, labels.flip(0), torch.eye(2)).digest
