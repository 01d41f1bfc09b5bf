"""Third-party suites and families, registered through entry points by a package installed in the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import save_file

PLUGIN = '''
"""A bag-of-words family and a suite built in code: what a team's own package registers."""
import zlib

import torch
from torch.func import functional_call

from evaluation.families.base import Family, Outputs, Runner
from evaluation.suite import Suite, TaskData
from evaluation.suite_file import RowExamples
from merging.checkpoints.alignment import state_entries

VOCAB = 64


def words(text):
    return [zlib.crc32(w.encode()) % VOCAB for w in str(text).lower().split()] or [0]


class BagOfWords(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.EmbeddingBag(VOCAB, 2, mode="mean")

    def forward(self, ids, offsets):
        return self.embedding(ids, offsets)


class BowRunner(Runner):
    def __init__(self, family, device):
        super().__init__(family, device)
        self.module = BagOfWords().to(device)
        self.entries = state_entries(self.module.state_dict())
        self.names = tuple(self.entries)

    def prepare(self, task, raw):
        ids, offsets = [], []
        for text in raw:
            offsets.append(len(ids))
            ids += words(text)
        return torch.tensor(ids, device=self.device), torch.tensor(offsets, device=self.device)

    def outputs(self, task, batch, state):
        return Outputs(scores=functional_call(self.module, dict(state), batch))


class BowFamily(Family):
    name = "bag-of-words"

    def __init__(self, heads=None, model_dir=None, explicit_model=False, options=None):
        self.options = dict(options or {})

    def create_model(self):
        return BagOfWords()

    def identity(self):
        return {"family": self.name, "vocab": VOCAB}

    def runner(self, device):
        return BowRunner(self, device)


def make_suite():
    rows = ["good movie", "bad film", "great food", "awful service"]
    labels = torch.tensor([1, 0, 1, 0])
    examples = RowExamples(rows, labels, "plugin-v1")
    task = TaskData("polarity", ("neg", "pos"), None, examples, examples)
    return Suite("plugin-suite", {"polarity": task}, BowFamily(), version="plugin-v1")
'''


METHODS = '''
"""A streaming method from a plugin: the base plus `factor` times the first model's task vector."""
from pydantic import Field

from merging.methods import MethodParams, merge_method


class ScaleParams(MethodParams):
    factor: float = Field(0.5, description="how far along the first task vector")


@merge_method("first_scaled", params=ScaleParams, paper="https://example.org/first-scaled")
def first_scaled(tensor, params, state):
    """θ_base + factor · (θ_1 − θ_base)."""
    for chunk in tensor.chunks():
        yield chunk.base + params.factor * (chunk.models[0] - chunk.base)
'''


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    package = root / "src"
    (package / "mergeyard_bow").mkdir(parents=True)
    (package / "mergeyard_bow" / "__init__.py").write_text(PLUGIN)
    (package / "mergeyard_bow" / "methods.py").write_text(METHODS)
    (package / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "mergeyard-bow"
        version = "0.1"

        [project.entry-points."mergeyard.families"]
        bag-of-words = "mergeyard_bow:BowFamily"

        [project.entry-points."mergeyard.suites"]
        plugin-suite = "mergeyard_bow:make_suite"

        [project.entry-points."mergeyard.methods"]
        first-scaled = "mergeyard_bow.methods"

        [tool.setuptools]
        packages = ["mergeyard_bow"]
    """))
    site = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(package)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return site


def test_a_plugin_suite_and_family_work_by_name_and_from_a_suite_file(installed_plugin, tmp_path):
    weights = {"embedding.weight": torch.randn(64, 2, generator=torch.Generator().manual_seed(0))}
    checkpoint = tmp_path / "bow.safetensors"
    save_file(weights, str(checkpoint))
    (tmp_path / "polarity.csv").write_text("text,label\ngood movie,pos\nbad film,neg\ngreat food,pos\n")
    suite_file = tmp_path / "bow.yaml"
    suite_file.write_text(yaml.safe_dump({"name": "bow-file", "family": "bag-of-words",
                                          "tasks": [{"name": "polarity", "eval": "polarity.csv"}]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_plugin), os.environ.get("PYTHONPATH", "")]),
           "MERGEYARD_HOME": str(tmp_path / "home")}
    reports = {}
    for suite in ("plugin-suite", str(suite_file)):
        done = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", str(checkpoint), "--suite", suite,
                               "--json"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        reports[suite] = json.loads(done.stdout)
    # checked by hand: the mean word embedding's larger column is the predicted class
    from zlib import crc32

    def predicted(text):
        ids = [crc32(w.encode()) % 64 for w in text.split()]
        return int(weights["embedding.weight"][ids].mean(0).argmax())

    expected = [predicted(t) == y for t, y in [("good movie", 1), ("bad film", 0), ("great food", 1), ("awful service", 0)]]
    assert reports["plugin-suite"]["tasks"][0]["accuracy"] == pytest.approx(sum(expected) / 4)
    assert reports[str(suite_file)]["suite"] == "bow-file"
    unknown = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", str(checkpoint), "--suite", "no-such-suite"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert unknown.returncode == 1 and "plugin-suite" in unknown.stderr  # the message lists the plugin's name


def test_a_plugin_method_is_listed_and_merges(installed_plugin, tmp_path):
    base, model = torch.zeros(3), torch.tensor([2.0, 4.0, -2.0])
    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    save_file({"w": model}, str(tmp_path / "a.safetensors"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"method": "first_scaled", "base": "base.safetensors",
                                                          "models": ["a.safetensors"], "parameters": {"factor": 0.25}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_plugin), os.environ.get("PYTHONPATH", "")]),
           "MERGEYARD_HOME": str(tmp_path / "home")}
    listed = subprocess.run([sys.executable, "-m", "flows.cli", "methods", "--json"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert listed.returncode == 0 and "first_scaled" in [m["name"] for m in json.loads(listed.stdout)]
    merged = subprocess.run([sys.executable, "-m", "flows.cli", "merge", str(tmp_path / "recipe.yaml"), "--out",
                             str(tmp_path / "out"), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert merged.returncode == 0, merged.stderr
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], torch.tensor([0.5, 1.0, -0.5]))
