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
- A few QQP rows are malformed (missing columns). A malformed train/dev row is an error naming the
  file and line unless skip_malformed (--skip-malformed-rows) is on, which skips and counts them
  (the reference GLUE processors skip them silently). Test rows are never dropped: every one must
  reach the submission file.
"""
from __future__ import annotations

import csv
import logging
import os
import sys

import datasets

from finetune.data_issues import DataIssues
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


def read_tsv_lines(path: str) -> list[tuple[int, list[str]]]:
    """(line number, row) for every non-blank line of a GLUE TSV (quoting off, BOM dropped)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            return [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); is it the official GLUE file?") from None


class MalformedRow(ValueError):
    """One row that cannot be read; the caller decides whether it is skipped or an error."""


def _label_id(task: GlueTask, raw: str) -> int | float:
    raw = raw.strip()
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise MalformedRow(f"score {raw!r} is not a number") from None
    if raw in task.label_names:
        return task.label_names.index(raw)
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < task.num_labels:
        raise MalformedRow(f"unknown label {raw!r} (expected one of {list(task.label_names)} "
                           f"or an id below {task.num_labels})")
    return value


def _mend_test_row(row: list[str], header: list[str], last_text: int) -> list[str]:
    """A test row with a wrong field count, fitted to the header so it still gets a prediction:
    surplus fields (a stray tab inside a sentence) are joined back into the last text column,
    missing trailing fields are empty."""
    if len(row) < len(header):
        return row + [""] * (len(header) - len(row))
    n_after = len(header) - last_text - 1
    tail = row[len(row) - n_after:] if n_after else []
    return row[:last_text] + ["\t".join(row[last_text:len(row) - n_after])] + tail


def _row_fields(task: GlueTask, header: list[str] | None, colmap: dict[str, str] | None,
                row: list[str]) -> dict[str, str]:
    if header is None:                     # headerless CoLA: source, label, original label, sentence
        if len(row) != 4:
            raise MalformedRow(f"{len(row)} fields where CoLA has 4")
        return {"sentence": row[3], "label": row[1]}
    if len(row) != len(header):
        raise MalformedRow(f"{len(row)} fields where the header has {len(header)}")
    return {colmap[h]: v for h, v in zip(header, row) if h in colmap}


def parse_glue_rows(task: GlueTask, rows: list[list[str]] | list[tuple[int, list[str]]],
                    path: str = "<rows>", skip_malformed: bool = False,
                    issues: DataIssues | None = None) -> dict[str, list]:
    """Turn the rows of one official TSV into hub-style columns (label = -1 when the file has none).

    rows: as read_tsv_lines gives them ((line, row) pairs; bare rows are numbered from 1).
    A labelled (train/dev) row that cannot be read is an error naming the file and line, or, with
    skip_malformed, skipped and counted in issues.skipped_rows. A test row (the file has no label
    column) is never dropped: a wrong field count is mended (_mend_test_row) and counted in
    issues.repaired_test_rows, because every test row must reach the submission file."""
    lines = [r if isinstance(r, tuple) else (n, r) for n, r in enumerate(rows, start=1)]
    out: dict[str, list] = {c: [] for c in task.text_columns}
    out["label"], out["idx"] = [], []
    if not lines:
        return out
    if task.name == "cola" and lines[0][1][:1] != ["index"]:
        header, body, colmap, is_test, last_text = None, lines, None, False, 3
    else:
        header, body = lines[0][1], lines[1:]
        colmap = _COLUMN_MAPS[task.name]
        mapped = [colmap.get(h) for h in header]
        missing = [c for c in task.text_columns if c not in mapped]
        if missing:
            raise ValueError(f"{path}: the header {header} lacks the columns for {missing}; "
                             f"is this the official GLUE {task.folder} file?")
        is_test = "label" not in mapped
        last_text = max(i for i, m in enumerate(mapped) if m in task.text_columns)
    skipped = repaired = 0
    for n, (line, row) in enumerate(body):
        try:
            if is_test and len(row) != len(header):
                row = _mend_test_row(row, header, last_text)
                repaired += 1
            fields = _row_fields(task, header, colmap, row)
            label = _label_id(task, fields["label"]) if "label" in fields else -1
            try:
                idx = int(fields["idx"]) if "idx" in fields else n
            except ValueError:
                raise MalformedRow(f"index {fields['idx']!r} is not an integer") from None
        except MalformedRow as e:
            if is_test:
                raise ValueError(f"{path}, line {line}: {e}; a test row must reach the submission "
                                 f"file with its index: fix the file.") from None
            if not skip_malformed:
                raise ValueError(f"{path}, line {line}: {e}. Fix the file, or pass "
                                 f"--skip-malformed-rows to skip such rows (they are counted "
                                 f"in result.json).") from None
            skipped += 1
            continue
        for c in task.text_columns:
            out[c].append(fields[c])
        out["label"].append(label)
        out["idx"].append(idx)
    if body and (not out["idx"] or repaired == len(body)):
        # Nothing readable (or, in a test file, not one row fitting the header): the wrong file.
        raise ValueError(f"{path}: none of its {len(body)} rows could be read as the header "
                         f"says; is this the official GLUE {task.folder} file?")
    if skipped:
        log.warning("%s: skipped %d malformed rows (--skip-malformed-rows)", path, skipped)
        if issues is not None:
            issues.skipped_rows[path] = skipped
    if repaired:
        log.warning("%s: %d test rows had a wrong number of fields; kept (surplus fields joined "
                    "into the last text column, missing ones empty) so they get a prediction",
                    path, repaired)
        if issues is not None:
            issues.repaired_test_rows[path] = repaired
    return out


def _features(task: GlueTask) -> datasets.Features:
    feats = {c: datasets.Value("string") for c in task.text_columns}
    feats["label"] = datasets.Value("float32" if task.is_regression else "int64")
    feats["idx"] = datasets.Value("int64")
    return datasets.Features(feats)


def resolve_task_dir(task: GlueTask, data_dir: str) -> str:
    """The task folder: DATA/<Folder> (GLUE download root) or DATA itself (the task folder).
    DATA/<Folder> counts as soon as it exists, so a file missing in it is reported as that file."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"GLUE data folder {data_dir!r} does not exist; pass --data pointing at the "
                         f"GLUE download (the folder holding {task.folder}/) or at {task.folder}/ itself.")
    nested = os.path.join(data_dir, task.folder)
    if os.path.isdir(nested):
        return nested
    own_files = ["train.tsv", *(_SPLIT_FILES[s] for s in task.dev_splits)]
    if any(os.path.isfile(os.path.join(data_dir, f)) for f in own_files):
        return data_dir
    first_dev = _SPLIT_FILES[task.dev_splits[0]]
    raise ValueError(
        f"No GLUE {task.folder} data under {data_dir!r}: expected "
        f"{os.path.join(data_dir, task.folder, first_dev)} (and train.tsv). Pass --data pointing at "
        f"the GLUE download (the folder holding {task.folder}/) or at {task.folder}/ itself."
    )


def split_files(task: GlueTask, data_dir: str, need_train: bool = True) -> dict[str, str]:
    """split -> path of every file a run reads that exists: train and dev are required (a missing
    one is an error naming it), test files are optional (left out when absent)."""
    task_dir = resolve_task_dir(task, data_dir)
    out = {}
    for split in (["train"] if need_train else []) + list(task.dev_splits):
        path = os.path.join(task_dir, _SPLIT_FILES[split])
        if not os.path.isfile(path):
            raise ValueError(f"Missing GLUE file {path} (the {split} split of {task.folder}).")
        out[split] = path
    for split in task.test_splits:
        path = os.path.join(task_dir, _SPLIT_FILES[split])
        if os.path.isfile(path):
            out[split] = path
    return out


def missing_test_files(task: GlueTask, data_dir: str) -> list[str]:
    task_dir = resolve_task_dir(task, data_dir)
    paths = [os.path.join(task_dir, _SPLIT_FILES[s]) for s in task.test_splits]
    return [p for p in paths if not os.path.isfile(p)]


def load_glue_local(task: GlueTask, data_dir: str, need_train: bool = True,
                    skip_malformed: bool = False, issues: DataIssues | None = None
                    ) -> datasets.DatasetDict:
    files = split_files(task, data_dir, need_train)
    for path in missing_test_files(task, data_dir):
        log.info("%s not found: no test predictions from it for %s", path, task.name)
        if issues is not None:
            issues.notes.append(f"{path} not found: no test predictions from it")
    out = {}
    for split, path in files.items():
        cols = parse_glue_rows(task, read_tsv_lines(path), path, skip_malformed, issues)
        if not split.startswith("test") and not cols["idx"]:
            raise ValueError(f"{path} holds no rows (the {split} split of {task.folder}).")
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


def load_glue(task: GlueTask, data_dir: str | None = None, skip_malformed: bool = False,
              issues: DataIssues | None = None) -> datasets.DatasetDict:
    """The local folder takes precedence when given; otherwise the hub."""
    if data_dir:
        return load_glue_local(task, data_dir, skip_malformed=skip_malformed, issues=issues)
    return load_glue_hub(task)


def ax_candidates(data_dir: str) -> list[str]:
    """Where the diagnostic set may be: under the GLUE download root, which is the parent of
    --data when --data is the MNLI folder itself."""
    roots = [data_dir]
    if os.path.isfile(os.path.join(data_dir, _SPLIT_FILES["validation_matched"])):
        roots.append(os.path.dirname(os.path.abspath(data_dir)))
    return [os.path.join(root, *rel) for root in roots
            for rel in (("diagnostic", "diagnostic.tsv"), ("AX", "test.tsv"))]


def load_glue_ax(data_dir: str | None = None, issues: DataIssues | None = None
                 ) -> datasets.Dataset | None:
    """The diagnostic set (AX), predicted with an MNLI model; None (said in the log and in
    issues.notes) when not available."""
    if data_dir:
        cands = ax_candidates(data_dir)
        for cand in cands:
            if os.path.isfile(cand):
                ax = GlueTask("ax", "diagnostic", ("premise", "hypothesis"), (), ())
                cols = parse_glue_rows(ax, read_tsv_lines(cand), cand, issues=issues)
                del cols["label"]
                return datasets.Dataset.from_dict(cols)
        reason = (f"AX.tsv not written: no diagnostic set at {' or '.join(cands)} (put the GLUE "
                  f"download's diagnostic/diagnostic.tsv there to get it)")
    else:
        try:
            return datasets.load_dataset(HUB_GLUE, "ax")["test"]
        except Exception as e:  # noqa: BLE001  (no AX is not fatal: the MNLI run goes on)
            reason = f"AX.tsv not written: the diagnostic set is not available from the hub ({e})"
    log.warning("%s", reason)
    if issues is not None:
        issues.notes.append(reason)
    return None
