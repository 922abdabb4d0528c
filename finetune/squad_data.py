"""SQuAD data: the official JSON files (v1.1 / v2.0) or the hub, as flat `datasets.Dataset`s.

Official layout: {"version": ..., "data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}], "is_impossible" (v2 only)}]}]}]}.
v2.0 unanswerable questions have answers == [] (and plausible_answers, which are not gold).
The flat rows use the hub's columns: id, title, context, question,
answers = {"text": [...], "answer_start": [...]}.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import datasets

from finetune.data_issues import DataIssues
from finetune.tasks import SquadTask

log = logging.getLogger(__name__)

_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "title": datasets.Value("string"),
    "context": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answers": {"text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32"))},
})


# answer_start is searched for its text this many characters either side when it does not point
# at it (off-by-some offsets, e.g. from a re-encoded context); farther away is an error.
ANSWER_SEARCH_WINDOW = 32


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         f"the file may be truncated or damaged: download it again.") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); is it the official SQuAD JSON file?") from None


def _field(obj: Any, key: str, kind: type | tuple[type, ...], path: str, where: str) -> Any:
    """obj[key], or a ValueError naming the file and the position in it."""
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: {where} has no {key!r}; the official SQuAD layout is "
                         f"data[].paragraphs[].qas[] with context, question, id and answers.")
    value = obj[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{path}: {where}: {key!r} should be a {names}, "
                         f"got {type(value).__name__}.")
    return value


def _answer_columns(qa: dict, path: str, where: str) -> dict[str, list]:
    # An unanswerable v2 question keeps its plausible_answers out of the gold answers.
    answers = [] if qa.get("is_impossible", False) else qa.get("answers", [])
    if not isinstance(answers, list):
        raise ValueError(f"{path}: {where}: 'answers' should be a list.")
    texts, starts = [], []
    for k, a in enumerate(answers):
        texts.append(_field(a, "text", str, path, f"{where} answer {k}"))
        start = _field(a, "answer_start", (int, str), path, f"{where} answer {k}")
        try:
            starts.append(int(start))
        except ValueError:
            raise ValueError(f"{path}: {where} answer {k}: answer_start {start!r} is not an "
                             f"integer.") from None
    return {"text": texts, "answer_start": starts}


def read_squad_json(path: str, issues: DataIssues | None = None, strict: bool = True
                    ) -> datasets.Dataset:
    """The questions of an official SQuAD file as flat rows, answer_start checked (see
    check_answer_starts; strict for a training file). Errors name the file and where in it."""
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{path} is not an official SQuAD file (no top-level 'data' list).")
    rows: dict[str, list] = {k: [] for k in _FEATURES}
    for i, article in enumerate(doc["data"]):
        for j, para in enumerate(_field(article, "paragraphs", list, path, f"article {i}")):
            where = f"article {i} paragraph {j}"
            context = _field(para, "context", str, path, where)
            for k, qa in enumerate(_field(para, "qas", list, path, where)):
                qid = _field(qa, "id", str, path, f"{where} question {k}")
                where_q = f"question {qid}"
                rows["id"].append(qid)
                rows["title"].append(article.get("title", ""))
                rows["context"].append(context)
                rows["question"].append(_field(qa, "question", str, path, where_q))
                rows["answers"].append(_answer_columns(qa, path, where_q))
    counts = check_answer_starts(rows["id"], rows["context"], rows["answers"], path, strict)
    _report_offsets(*counts, path, issues)
    return datasets.Dataset.from_dict(rows, features=_FEATURES)


def _nearest_occurrence(context: str, text: str, start: int, window: int) -> int | None:
    lo = max(0, start - window)
    hi = min(len(context), max(0, start) + window + len(text))
    best = None
    pos = context.find(text, lo, hi)
    while pos != -1:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        pos = context.find(text, pos + 1, hi)
    return best


def check_answer_starts(ids: list[str], contexts: list[str], answers: list[dict], source: str,
                        strict: bool = True, window: int = ANSWER_SEARCH_WINDOW) -> tuple[int, int]:
    """Make every answer_start point at its answer text: one that does not is moved (in place) to
    the nearest occurrence of the text within `window` characters. Training labels come from
    answer_start, so a shifted file would otherwise train silently on wrong spans: when the text
    is not that close, strict (training data) raises a ValueError naming the file and the
    question; otherwise (dev data, scored on answer texts only) the offset is left and counted.
    Returns (answers moved, answers left unmatched)."""
    repairs = unmatched = 0
    for qid, context, ans in zip(ids, contexts, answers):
        for k, (text, start) in enumerate(zip(ans["text"], ans["answer_start"])):
            if 0 <= start and context[start:start + len(text)] == text:
                continue
            found = _nearest_occurrence(context, text, start, window)
            if found is None and not strict:
                unmatched += 1
                continue
            if found is None:
                raise ValueError(
                    f"{source}: question {qid}: answer {text!r} is not at its answer_start {start} "
                    f"(the context there reads {context[max(0, start):max(0, start) + len(text)]!r}) "
                    f"nor within {window} characters of it; the file's offsets do not match its "
                    f"contexts: use the official file.")
            ans["answer_start"][k] = found
            repairs += 1
    return repairs, unmatched


def _report_offsets(repairs: int, unmatched: int, source: str, issues: DataIssues | None) -> None:
    if repairs:
        log.warning("%s: %d answer_start offsets did not point at their answer text and were moved "
                    "to the nearest occurrence within %d characters", source, repairs,
                    ANSWER_SEARCH_WINDOW)
        if issues is not None:
            issues.answer_start_repairs[source] = repairs
    if unmatched:
        note = (f"{source}: {unmatched} answers are not within {ANSWER_SEARCH_WINDOW} characters "
                f"of their answer_start; left as they are (dev answers are scored by their text)")
        log.warning("%s", note)
        if issues is not None:
            issues.notes.append(note)


def _check_hub_split(ds: datasets.Dataset, source: str, issues: DataIssues | None,
                     strict: bool) -> datasets.Dataset:
    answers = [{"text": list(a["text"]), "answer_start": list(a["answer_start"])}
               for a in ds["answers"]]
    repairs, unmatched = check_answer_starts(ds["id"], ds["context"], answers, source, strict)
    _report_offsets(repairs, unmatched, source, issues)
    if repairs:
        ds = ds.map(lambda _, i: {"answers": answers[i]}, with_indices=True)
    return ds


def resolve_squad_file(task: SquadTask, data_dir: str, split: str) -> str:
    name = task.train_file if split == "train" else task.dev_file
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise ValueError(
            f"Missing SQuAD file {path}: pass --data pointing at a folder holding the official "
            f"{task.train_file} and {task.dev_file}."
        )
    return path


def load_squad(task: SquadTask, data_dir: str | None = None, need_train: bool = True,
               issues: DataIssues | None = None) -> datasets.DatasetDict:
    """Splits "train" and "validation". A local folder takes precedence over the hub. Repaired
    answer_start offsets are counted into `issues`; one far from its text is an error in the
    training split, only counted in the dev split (whose answer_start nothing uses)."""
    splits = (["train"] if need_train else []) + ["validation"]
    if data_dir:
        if not os.path.isdir(data_dir):
            raise ValueError(f"SQuAD data folder {data_dir!r} does not exist; pass --data pointing "
                             f"at a folder holding {task.train_file} and {task.dev_file}.")
        paths = {s: resolve_squad_file(task, data_dir, s) for s in splits}
        return datasets.DatasetDict({s: read_squad_json(p, issues, strict=s == "train")
                                     for s, p in paths.items()})
    try:
        ds = datasets.load_dataset(task.hub_path)
    except Exception as e:
        raise ValueError(f"Could not load {task.hub_path} from the hub: {e}. Offline, pass --data "
                         f"pointing at a folder holding {task.train_file} and {task.dev_file}.") from e
    return datasets.DatasetDict({s: _check_hub_split(ds[s], f"{task.hub_path} {s}", issues,
                                                     strict=s == "train") for s in splits})


def gold_answers(dataset: datasets.Dataset) -> dict[str, list[str]]:
    """qid -> gold answer texts ([] when unanswerable), the input of metrics.squad_evaluate."""
    return {qid: list(ans["text"]) for qid, ans in zip(dataset["id"], dataset["answers"])}
