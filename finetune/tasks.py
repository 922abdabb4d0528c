"""The finetuning tasks: GLUE's nine tasks and SQuAD v1.1 / v2.0, described once.

Everything task-specific that the loaders, the trainer, the metrics and the submission writer need
lives in `GlueTask` / `SquadTask`, so the rest of the package is task-agnostic.
Column names and label ids follow the Hugging Face hub dataset `nyu-mll/glue`, so data loaded from
the hub and data read from the official GLUE download look the same to the rest of the code.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GlueTask:
    name: str                       # canonical name = the hub config name ("sst2", "mnli", ...)
    folder: str                     # folder of the official GLUE download ("SST-2", "MNLI", ...)
    text_columns: tuple[str, ...]   # one (single sentence) or two (pair) columns
    label_names: tuple[str, ...]    # label id -> official label string; () for regression (STS-B)
    metrics: tuple[str, ...]        # metric names computed on dev; the task score is their mean
    dev_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    # Suffix appended to the metric names of each dev split ("_m"/"_mm" for MNLI's two dev sets).
    dev_metric_suffixes: tuple[str, ...] = ("",)
    # GLUE submission file per test split (MNLI has two).
    submission_files: tuple[str, ...] = ()
    # True when the submission wants label strings (entailment / not_entailment ...), not ids.
    submit_label_strings: bool = False

    @property
    def score_metrics(self) -> tuple[str, ...]:
        """GLUE's task score is the unweighted mean of all the task's metrics."""
        return self.metrics

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_glue(self) -> bool:
        return True


@dataclass(frozen=True)
class SquadTask:
    name: str                       # "squad" (v1.1) or "squad_v2"
    version_2: bool
    hub_path: str
    train_file: str                 # official file names in a local folder
    dev_file: str
    metrics: tuple[str, ...] = ("exact", "f1")
    # The sweep picks learning rates by F1, the metric SQuAD results are usually quoted by.
    score_metrics: tuple[str, ...] = ("f1",)

    @property
    def is_glue(self) -> bool:
        return False


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("mcc",),
                 submission_files=("CoLA.tsv",)),
        GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",),
                 submission_files=("SST-2.tsv",)),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                 ("f1", "accuracy"), submission_files=("MRPC.tsv",)),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearman"),
                 submission_files=("STS-B.tsv",)),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"),
                 ("f1", "accuracy"), submission_files=("QQP.tsv",)),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), _NLI3, ("accuracy_m", "accuracy_mm"),
                 dev_splits=("validation_matched", "validation_mismatched"),
                 test_splits=("test_matched", "test_mismatched"), dev_metric_suffixes=("_m", "_mm"),
                 submission_files=("MNLI-m.tsv", "MNLI-mm.tsv"), submit_label_strings=True),
        GlueTask("qnli", "QNLI", ("question", "sentence"), _NLI2, ("accuracy",),
                 submission_files=("QNLI.tsv",), submit_label_strings=True),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), _NLI2, ("accuracy",),
                 submission_files=("RTE.tsv",), submit_label_strings=True),
        # WNLI's ids are 0 = not_entailment, 1 = entailment (as in its TSV and on the hub).
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
                 ("accuracy",), submission_files=("WNLI.tsv",)),
    ]
}

SQUAD_TASKS: dict[str, SquadTask] = {
    "squad": SquadTask("squad", False, "rajpurkar/squad", "train-v1.1.json", "dev-v1.1.json"),
    "squad_v2": SquadTask("squad_v2", True, "rajpurkar/squad_v2", "train-v2.0.json",
                          "dev-v2.0.json"),
}

# Spellings people use for the same task (GLUE folder names, dashes, versions).
_ALIASES = {
    "sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli",
    "squad1": "squad", "squad1.1": "squad", "squad_v1": "squad", "squad-v1.1": "squad",
    "squad_v1.1": "squad", "squad2": "squad_v2", "squad2.0": "squad_v2", "squad-v2": "squad_v2",
    "squad_v2.0": "squad_v2", "squad-v2.0": "squad_v2",
}

ALL_TASK_NAMES: tuple[str, ...] = tuple(GLUE_TASKS) + tuple(SQUAD_TASKS)


def canonical_task_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS and key not in SQUAD_TASKS:
        raise ValueError(
            f"Unknown task {name!r}. Valid tasks: {', '.join(ALL_TASK_NAMES)} "
            f"(GLUE folder names such as SST-2 or STS-B work too)."
        )
    return key


def get_task(name: str) -> GlueTask | SquadTask:
    key = canonical_task_name(name)
    return GLUE_TASKS[key] if key in GLUE_TASKS else SQUAD_TASKS[key]
