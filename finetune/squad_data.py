"""SQuAD data: the official JSON files (v1.1 / v2.0) or the hub, as flat `datasets.Dataset`s.

Official layout: {"version": ..., "data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}], "is_impossible" (v2 only)}]}]}]}.
v2.0 unanswerable questions have answers == [] (and plausible_answers, which are not gold).
The flat rows use the hub's columns: id, title, context, question,
answers = {"text": [...], "answer_start": [...]}.
"""
from __future__ import annotations

import json
import os

import datasets

from finetune.tasks import SquadTask

_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "title": datasets.Value("string"),
    "context": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answers": {"text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32"))},
})


def read_squad_json(path: str) -> datasets.Dataset:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "data" not in doc:
        raise ValueError(f"{path} is not an official SQuAD file (no top-level 'data' list).")
    rows: dict[str, list] = {k: [] for k in _FEATURES}
    for article in doc["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                # An unanswerable v2 question keeps its plausible_answers out of the gold answers.
                answers = [] if qa.get("is_impossible", False) else qa.get("answers", [])
                rows["id"].append(qa["id"])
                rows["title"].append(article.get("title", ""))
                rows["context"].append(para["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in answers],
                                        "answer_start": [int(a["answer_start"]) for a in answers]})
    return datasets.Dataset.from_dict(rows, features=_FEATURES)


def resolve_squad_file(task: SquadTask, data_dir: str, split: str) -> str:
    name = task.train_file if split == "train" else task.dev_file
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise ValueError(
            f"Missing SQuAD file {path}: pass --data pointing at a folder holding the official "
            f"{task.train_file} and {task.dev_file}."
        )
    return path


def load_squad(task: SquadTask, data_dir: str | None = None, need_train: bool = True
               ) -> datasets.DatasetDict:
    """Splits "train" and "validation". A local folder takes precedence over the hub."""
    splits = (["train"] if need_train else []) + ["validation"]
    if data_dir:
        if not os.path.isdir(data_dir):
            raise ValueError(f"SQuAD data folder {data_dir!r} does not exist; pass --data pointing "
                             f"at a folder holding {task.train_file} and {task.dev_file}.")
        paths = {s: resolve_squad_file(task, data_dir, s) for s in splits}
        return datasets.DatasetDict({s: read_squad_json(p) for s, p in paths.items()})
    try:
        ds = datasets.load_dataset(task.hub_path)
    except Exception as e:
        raise ValueError(f"Could not load {task.hub_path} from the hub: {e}. Offline, pass --data "
                         f"pointing at a folder holding {task.train_file} and {task.dev_file}.") from e
    return datasets.DatasetDict({s: ds[s] for s in splits})


def gold_answers(dataset: datasets.Dataset) -> dict[str, list[str]]:
    """qid -> gold answer texts ([] when unanswerable), the input of metrics.squad_evaluate."""
    return {qid: list(ans["text"]) for qid, ans in zip(dataset["id"], dataset["answers"])}
