"""GLUE data: from a local folder in the official GLUE download layout, or from the hub.

Both paths return a `datasets.DatasetDict` with the hub's split and column names
(`nyu-mll/glue`: text columns of the task, `label` (int id; float for STS-B; -1 on test), `idx`),
so everything downstream is the same whichever source was used.

The official TSVs have quirks that matter:
- CoLA train/dev have no header (source, label, original label, sentence); its test has one.
- MRPC's train.tsv starts with a UTF-8 byte-order mark (copied from msr_paraphrase_train.txt).
- MNLI has two dev and two test sets (matched / mismatched); its dev files carry five annotator
  labels and the gold label in the last column.
- Sentences contain stray double quotes, so quoting must be off (csv.QUOTE_NONE) or rows merge.
- A few QQP rows are malformed (missing columns); they are skipped with a warning, as the
  reference GLUE processors do.
"""
from __future__ import annotations

import csv
import logging
import os
import sys

import datasets

from finetune.tasks import GlueTask

log = logging.getLogger(__name__)

# Some GLUE fields (QQP, MNLI parses) are longer than csv's default 128 KiB field limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

HUB_GLUE = "nyu-mll/glue"

# split name -> file name inside the task folder
_SPLIT_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "test": "test.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}

# header name in the official TSV -> hub column name, per task
_COLUMN_MAPS: dict[str, dict[str, str]] = {
    "cola": {"index": "idx", "sentence": "sentence"},   # test only; train/dev are headerless
    "sst2": {"index": "idx", "sentence": "sentence", "label": "label"},
    "mrpc": {"index": "idx", "#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
    "stsb": {"index": "idx", "sentence1": "sentence1", "sentence2": "sentence2", "score": "label"},
    "qqp": {"id": "idx", "question1": "question1", "question2": "question2", "is_duplicate": "label"},
    "mnli": {"index": "idx", "sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
    "qnli": {"index": "idx", "question": "question", "sentence": "sentence", "label": "label"},
    "rte": {"index": "idx", "sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
    "wnli": {"index": "idx", "sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
    "ax": {"index": "idx", "sentence1": "premise", "sentence2": "hypothesis"},
}


def read_tsv(path: str) -> list[list[str]]:
    """All rows of a GLUE TSV, quoting off. utf-8-sig drops MRPC's byte-order mark."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _label_id(task: GlueTask, raw: str) -> int | float | None:
    raw = raw.strip()
    if task.is_regression:
        return float(raw)
    if raw in task.label_names:
        return task.label_names.index(raw)
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if 0 <= value < task.num_labels else None


def parse_glue_rows(task: GlueTask, rows: list[list[str]], path: str = "<rows>") -> dict[str, list]:
    """Turn the rows of one official TSV into hub-style columns (label = -1 when the file has none)."""
    out: dict[str, list] = {c: [] for c in task.text_columns}
    out["label"], out["idx"] = [], []
    if not rows:
        return out
    if task.name == "cola" and rows[0][:1] != ["index"]:
        # Headerless train/dev: source, label, original label (* or empty), sentence.
        header, body, colmap = None, rows, None
    else:
        header, body = rows[0], rows[1:]
        colmap = _COLUMN_MAPS[task.name]
        missing = [c for c in task.text_columns if c not in [colmap.get(h) for h in header]]
        if missing:
            raise ValueError(f"{path}: the header {header} lacks the columns for {missing}; "
                             f"is this the official GLUE {task.folder} file?")
    skipped = 0
    for n, row in enumerate(body):
        if header is None:
            if len(row) != 4:
                skipped += 1
                continue
            fields = {"sentence": row[3], "label": row[1]}
        else:
            if len(row) != len(header):
                skipped += 1
                continue
            fields = {colmap[h]: v for h, v in zip(header, row) if h in colmap}
        label = -1
        if "label" in fields:
            label = _label_id(task, fields["label"])
            if label is None:
                skipped += 1
                continue
        for c in task.text_columns:
            out[c].append(fields[c])
        out["label"].append(label)
        out["idx"].append(int(fields["idx"]) if "idx" in fields else n)
    if skipped:
        log.warning("%s: skipped %d malformed or unlabelled rows", path, skipped)
    return out


def _features(task: GlueTask) -> datasets.Features:
    feats = {c: datasets.Value("string") for c in task.text_columns}
    feats["label"] = datasets.Value("float32" if task.is_regression else "int64")
    feats["idx"] = datasets.Value("int64")
    return datasets.Features(feats)


def resolve_task_dir(task: GlueTask, data_dir: str) -> str:
    """The task folder: DATA/<Folder> (GLUE download root) or DATA itself (the task folder)."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"GLUE data folder {data_dir!r} does not exist; pass --data pointing at the "
                         f"GLUE download (the folder holding {task.folder}/) or at {task.folder}/ itself.")
    first_dev = _SPLIT_FILES[task.dev_splits[0]]
    for cand in (os.path.join(data_dir, task.folder), data_dir):
        if os.path.isfile(os.path.join(cand, first_dev)):
            return cand
    raise ValueError(
        f"No GLUE {task.folder} data under {data_dir!r}: expected "
        f"{os.path.join(data_dir, task.folder, first_dev)} (and train.tsv). Pass --data pointing at "
        f"the GLUE download (the folder holding {task.folder}/) or at {task.folder}/ itself."
    )


def load_glue_local(task: GlueTask, data_dir: str, need_train: bool = True) -> datasets.DatasetDict:
    task_dir = resolve_task_dir(task, data_dir)
    splits = (["train"] if need_train else []) + list(task.dev_splits) + list(task.test_splits)
    out = {}
    for split in splits:
        path = os.path.join(task_dir, _SPLIT_FILES[split])
        if not os.path.isfile(path):
            if split.startswith("test"):
                log.info("%s not found: no test predictions for %s", path, task.name)
                continue
            raise ValueError(f"Missing GLUE file {path} (the {split} split of {task.folder}).")
        cols = parse_glue_rows(task, read_tsv(path), path)
        out[split] = datasets.Dataset.from_dict(cols, features=_features(task))
    return datasets.DatasetDict(out)


def load_glue_hub(task: GlueTask) -> datasets.DatasetDict:
    try:
        ds = datasets.load_dataset(HUB_GLUE, task.name)
    except Exception as e:  # offline, or the hub is unreachable: say what to do instead
        raise ValueError(
            f"Could not load GLUE {task.name} from the hub ({HUB_GLUE}): {e}. Offline, pass --data "
            f"pointing at the GLUE download (the folder holding {task.folder}/)."
        ) from e
    keep = ["train", *task.dev_splits, *task.test_splits]
    return datasets.DatasetDict({s: ds[s] for s in keep if s in ds})


def load_glue(task: GlueTask, data_dir: str | None = None) -> datasets.DatasetDict:
    """The local folder takes precedence when given; otherwise the hub."""
    return load_glue_local(task, data_dir) if data_dir else load_glue_hub(task)


def load_glue_ax(data_dir: str | None = None) -> datasets.Dataset | None:
    """The diagnostic set (AX), predicted with an MNLI model; None when not available."""
    if data_dir:
        for cand in (os.path.join(data_dir, "diagnostic", "diagnostic.tsv"),
                     os.path.join(data_dir, "AX", "test.tsv")):
            if os.path.isfile(cand):
                ax = GlueTask("ax", "diagnostic", ("premise", "hypothesis"), (), ())
                cols = parse_glue_rows(ax, read_tsv(cand), cand)
                del cols["label"]
                return datasets.Dataset.from_dict(cols)
        return None
    try:
        return datasets.load_dataset(HUB_GLUE, "ax")["test"]
    except Exception as e:
        log.warning("AX diagnostic set not available from the hub (%s); AX.tsv not written", e)
        return None
