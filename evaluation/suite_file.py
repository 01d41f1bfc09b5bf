"""Suite files: a team's own tasks, data and heads, as YAML.

    name: support-tickets
    family: text-classification      # text-classification | image-classification | causal-lm | a plugin's
    model: models/base               # config / tokenizer / preprocessing (default: the evaluated model's, or its base's)
    options: {max_length: 128}       # the family's settings
    tasks:
      - name: sentiment
        eval: data/sentiment-test.csv
        calibration: data/sentiment-train.csv   # few-shot data for FW, MuDSC, MAP and relevance scores
        text: review                 # input column (default: text; image for images)
        label: stars                 # label column (default: label)
        head: models/ft-sentiment    # the fine-tune whose head (the tensors the merge lacks) scores this task
        metric: accuracy             # accuracy | macro_f1 | choice_accuracy | perplexity
      - name: topic
        eval: data/topic.jsonl
        split: {eval: 0.2, calibration: 0.1, seed: 0}   # one file, split deterministically

Relative paths resolve against the suite file. The digest covers the canonical
form and the content of every data file and head (not where they lie), so an
edited CSV is a new suite and a moved folder is not. A bad file fails in one
line naming the key, file, row or label, before anything is evaluated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evaluation.datafiles import DataError, Table, read_table
from evaluation.families import get_family
from evaluation.suite import Suite, TaskData
from merging.errors import MergeyardError
from merging.yaml_input import YamlDoc, read_yaml, validation_problems

Metric = Literal["accuracy", "macro_f1", "choice_accuracy", "perplexity"]
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
# Resolves a model reference the suite names (a registered model, a source URI) to a local directory; the flows
# pass the registry's, plain paths need none.
ModelResolver = Callable[[str], Path]


class SuiteFileError(MergeyardError):
    """A suite file that cannot be used as written."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitSpec(_Strict):
    eval: float = Field(gt=0, le=1, description="fraction of the rows to evaluate on")
    calibration: float = Field(0.0, ge=0, lt=1, description="fraction of the rows for calibration")
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> "SplitSpec":
        if self.eval + self.calibration > 1:
            raise ValueError("eval + calibration fractions exceed 1")
        return self


class TaskSpec(_Strict):
    name: str = Field(pattern=NAME)
    eval: str = Field(min_length=1, description="evaluation data (or all of it, with `split`)")
    calibration: str | None = None
    split: SplitSpec | None = None
    text: str | None = Field(None, description="input column (text families; the context for multiple choice)")
    image: str | None = Field(None, description="input column of image paths (image families)")
    label: str = "label"
    choices: str | list[str] | None = Field(None, description="multiple choice: a column of lists, or column names")
    classes: list[str] | None = Field(None, description="class names in the head's output order")
    head: str | None = None
    metric: Metric | None = None
    reference_accuracy: float | None = Field(None, gt=0, le=1, description="the task's own fine-tune: normalises")
    max_examples: int | None = Field(None, gt=0, description="use at most this many evaluation rows")

    @model_validator(mode="after")
    def _one_calibration_source(self) -> "TaskSpec":
        if self.split is not None and self.calibration is not None:
            raise ValueError("give `calibration:` or `split:`, not both")
        return self


class SuiteSpec(_Strict):
    name: str = Field(pattern=NAME)
    family: str
    model: str | None = None
    description: str | None = None
    options: dict[str, int | float | str | bool] = Field(default_factory=dict)
    tasks: list[TaskSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_tasks(self) -> "SuiteSpec":
        seen = set()
        for t in self.tasks:
            if t.name in seen:
                raise ValueError(f"two tasks are named {t.name!r}")
            seen.add(t.name)
        return self


@dataclass(frozen=True)
class RowExamples:
    """Rows of a data file: raw inputs (texts, image paths, (context, choices)) and label indices."""

    rows: list[Any]
    labels: torch.Tensor
    key: str  # what selected them: the file's digest, the columns, the split

    def __len__(self) -> int:
        return len(self.rows)

    def inputs(self, rows: slice) -> list[Any]:
        return self.rows[rows]

    def digest(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()


def _as_index(value: Any, classes: list[str] | None, limit: int | None) -> int | None:
    """A label as a class index: its name among `classes`, else an integer index below `limit`."""
    if classes is not None and str(value) in classes:
        return classes.index(str(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    index = int(number)
    if number != index or index < 0 or (limit is not None and index >= limit):
        return None
    return index


class _TaskBuilder:
    def __init__(self, spec: SuiteSpec, family_cls: type, root: Path, resolve: ModelResolver | None,
                 hf_cache: Path | None):
        self.spec, self.family_cls, self.root, self.resolve, self.hf_cache = spec, family_cls, root, resolve, hf_cache

    def path(self, ref: str, what: str) -> Path:
        """A checkpoint or model directory the suite names: beside the suite file, else a registered model or
        source (where the caller can resolve those)."""
        local = (self.root / ref.removeprefix("file://")).expanduser()
        if local.exists():
            return local
        if self.resolve is None:
            raise SuiteFileError(f"{what}: {ref}: no such file or directory (relative paths are taken from the "
                                 "suite file's folder)")
        try:
            return Path(self.resolve(ref))
        except MergeyardError as exc:
            raise SuiteFileError(f"{what}: {ref!r} is neither a path beside the suite file nor a model ({exc})") from None

    def table(self, ref: str, what: str) -> Table:
        try:
            table = read_table(ref, self.root, self.hf_cache)
        except DataError as exc:
            raise SuiteFileError(f"{what}: {exc}") from None
        if not table.rows:
            raise SuiteFileError(f"{what}: {ref} holds no rows")
        return table

    def rows(self, task: TaskSpec, table: Table, indices: list[int], classes, limit, what: str) -> RowExamples:
        metric = task.metric
        if metric == "perplexity":
            texts = table.column(task.text or "text", "the texts")
            rows = [texts[i] for i in indices]
            labels = [-1] * len(rows)
        elif metric == "choice_accuracy":
            contexts = table.column(task.text or "context", "the contexts")
            if isinstance(task.choices, list):
                columns = [table.column(c, "a choice") for c in task.choices]
                choice_lists = [[col[i] for col in columns] for i in range(len(table.rows))]
            else:
                choice_lists = table.column(task.choices or "choices", "the choices")
            answers = table.column(task.label, "the answers")
            rows, labels = [], []
            for i in indices:
                choices = choice_lists[i]
                if isinstance(choices, str):
                    try:
                        choices = json.loads(choices)
                    except json.JSONDecodeError:
                        choices = None
                if not isinstance(choices, list) or len(choices) < 2:
                    raise SuiteFileError(f"{what}: row {i + 1} of {table.source} has no list of two or more choices")
                index = _as_index(answers[i], [str(c) for c in choices], len(choices))
                if index is None:
                    raise SuiteFileError(f"{what}: row {i + 1} of {table.source} has answer {answers[i]!r}, neither a "
                                         f"choice nor an index below {len(choices)}")
                rows.append((contexts[i], [str(c) for c in choices]))
                labels.append(index)
        else:
            column = task.image or task.text or self.family_cls.input_column
            inputs = table.column(column, "the inputs")
            values = table.column(task.label, "the labels")
            rows, labels = [], []
            for i in indices:
                index = _as_index(values[i], classes, limit)
                if index is None:
                    shown = ", ".join(classes) if classes else f"an integer below {limit}" if limit else "a class"
                    raise SuiteFileError(f"{what}: row {i + 1} of {table.source} has label {values[i]!r}, not one of "
                                         f"the head's classes ({shown})")
                if column == "image" or task.image:
                    value = inputs[i]
                    if isinstance(value, str) and not Path(value).is_absolute():
                        value = str((self.root / value).resolve())
                    rows.append(value)
                else:
                    rows.append(inputs[i])
                labels.append(index)
        key = json.dumps({"file": table.digest, "task": task.model_dump(exclude={"head", "eval", "calibration"}),
                          "rows": hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest(),
                          "classes": classes}, sort_keys=True)
        return RowExamples(rows, torch.tensor(labels, dtype=torch.long), key)

    def classes(self, task: TaskSpec, head, tables: list[Table], what: str) -> tuple[list[str] | None, int | None]:
        """Class names (where known) and the number of classes (where a head fixes it)."""
        if task.metric in ("perplexity", "choice_accuracy"):
            return None, None
        limit = getattr(head, "num_labels", None)
        named = task.classes or (head.classes if head is not None else None)
        if task.classes and limit is not None and len(task.classes) != limit:
            raise SuiteFileError(f"{what}: `classes` lists {len(task.classes)} names but the head has {limit} outputs")
        if named is None and head is None:  # a family without heads: the classes the data holds, sorted
            values = {str(v) for t in tables for v in t.column(task.label, "the labels")}
            named = sorted(values, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
        return named, limit if limit is not None else (len(named) if named else None)

    def task(self, task: TaskSpec) -> TaskData:
        what = f"task {task.name!r}"
        metric = task.metric or self.family_cls.metrics[0]
        if metric not in self.family_cls.metrics:
            raise SuiteFileError(f"{what}: metric {metric!r} is not one a {self.spec.family} suite measures "
                                 f"({', '.join(self.family_cls.metrics)})")
        task = task.model_copy(update={"metric": metric})
        head = None
        if task.head is not None:
            head = self.family_cls.load_head(self.path(task.head, f"{what}: head"), f"{what}: head")
        elif self.family_cls.uses_heads:
            raise SuiteFileError(f"{what}: a {self.spec.family} task needs a `head:` (the fine-tune whose classifier "
                                 "scores it)")
        evaluation = self.table(task.eval, f"{what}: eval")
        calibration = self.table(task.calibration, f"{what}: calibration") if task.calibration else None
        classes, limit = self.classes(task, head, [evaluation] + ([calibration] if calibration else []), what)
        n = len(evaluation.rows)
        if task.split is not None:
            order = np.random.default_rng(task.split.seed).permutation(n).tolist()
            n_eval = max(1, round(task.split.eval * n))
            n_cal = round(task.split.calibration * n)
            eval_rows, cal_rows = order[:n_eval], order[n_eval:n_eval + n_cal]
            cal_table = evaluation
        else:
            eval_rows, cal_rows = list(range(n)), list(range(len(calibration.rows))) if calibration else []
            cal_table = calibration
        if task.max_examples:
            eval_rows = eval_rows[:task.max_examples]
        test = self.rows(task, evaluation, eval_rows, classes, limit, what)
        fewshot = self.rows(task, cal_table, cal_rows, classes, limit, what) if cal_table is not None and cal_rows \
            else RowExamples([], torch.zeros(0, dtype=torch.long), "none")
        shown = tuple(classes) if classes else tuple(str(i) for i in range(limit or 0))
        return TaskData(task.name, shown, head, fewshot, test, metric)


def parse_suite(doc: YamlDoc, *, resolve: ModelResolver | None = None, hf_cache: Path | None = None) -> Suite:
    where = str(doc.path) if doc.path else "suite"
    if not isinstance(doc.data, dict):
        raise SuiteFileError(f"{where}: a suite file is a mapping with `name:`, `family:` and `tasks:`")
    try:
        spec = SuiteSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise SuiteFileError(f"{where}: invalid suite: {validation_problems(exc, doc)}") from None
    try:
        family_cls = get_family(spec.family)
    except MergeyardError as exc:
        raise SuiteFileError(f"{where}: family: {exc}") from None
    root = doc.path.resolve().parent if doc.path else Path.cwd()
    builder = _TaskBuilder(spec, family_cls, root, resolve, hf_cache)
    try:
        tasks = {t.name: builder.task(t) for t in spec.tasks}
        model_dir = builder.path(spec.model, "model") if spec.model else None
        if model_dir is not None and model_dir.is_file():
            model_dir = model_dir.parent
        family = family_cls.from_suite_file({n: t.head for n, t in tasks.items() if t.head is not None}, model_dir,
                                            spec.model is not None, spec.options)
    except SuiteFileError as exc:
        raise SuiteFileError(f"{where}: {exc}") from None
    except MergeyardError as exc:
        raise SuiteFileError(f"{where}: {exc}") from None
    reference = {t.name: t.reference_accuracy for t in spec.tasks if t.reference_accuracy}
    canonical = spec.model_dump(exclude={"tasks", "model", "description"})
    return Suite(spec.name, tasks, family, reference, version="suite-file-v1/" + json.dumps(canonical, sort_keys=True),
                 source=str(doc.path.resolve()) if doc.path else None)


def load_suite_file(path: str | Path, *, resolve: ModelResolver | None = None, hf_cache: Path | None = None) -> Suite:
    return parse_suite(read_yaml(path, SuiteFileError, "suite"), resolve=resolve, hf_cache=hf_cache)
