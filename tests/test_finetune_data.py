"""GLUE / SQuAD loaders on fixtures in the exact official formats (tests/fixtures/glue, .../squad).
Nothing here touches the network: a local folder is always passed."""
import os
import shutil

import pytest

from finetune import glue_data, squad_data
from finetune.tasks import GLUE_TASKS, canonical_task_name, get_task

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
GLUE = os.path.join(FIX, "glue")
SQUAD = os.path.join(FIX, "squad")

# task -> (train rows, {dev split: rows}, {test split: rows}); QQP's train has one malformed row.
EXPECTED = {
    "cola": (5, {"validation": 4}, {"test": 3}),
    "sst2": (6, {"validation": 3}, {"test": 2}),
    "mrpc": (4, {"validation": 3}, {"test": 2}),
    "stsb": (5, {"validation": 4}, {"test": 2}),
    "qqp": (4, {"validation": 3}, {"test": 2}),
    "mnli": (7, {"validation_matched": 3, "validation_mismatched": 4},
             {"test_matched": 2, "test_mismatched": 1}),
    "qnli": (3, {"validation": 2}, {"test": 1}),
    "rte": (3, {"validation": 2}, {"test": 2}),
    "wnli": (4, {"validation": 2}, {"test": 1}),
}


@pytest.mark.parametrize("name", list(GLUE_TASKS))
def test_glue_local_loader_reads_every_task(name):
    task = GLUE_TASKS[name]
    ds = glue_data.load_glue(task, GLUE)
    n_train, devs, tests = EXPECTED[name]
    assert len(ds["train"]) == n_train
    for split, n in {**devs, **tests}.items():
        assert len(ds[split]) == n, split
    for split in ds:
        assert set(ds[split].column_names) == {*task.text_columns, "label", "idx"}
        for c in task.text_columns:
            assert all(isinstance(t, str) and t for t in ds[split][c])
    for split in ["train", *devs]:
        labels = ds[split]["label"]
        if task.is_regression:
            assert all(0.0 <= x <= 5.0 for x in labels)
        else:
            assert set(labels) <= set(range(task.num_labels))
    for split in tests:
        assert set(ds[split]["label"]) == {-1}


def test_glue_loader_values_and_quirks():
    cola = glue_data.load_glue(GLUE_TASKS["cola"], GLUE)          # headerless train/dev
    assert cola["train"][0]["sentence"].startswith("Our friends won't buy")
    assert cola["train"]["label"] == [1, 1, 0, 0, 1]
    assert cola["validation"][2]["sentence"] == 'He said "hello" to the "guests.'   # quoting off
    assert cola["test"]["idx"] == [0, 1, 2]

    mrpc = glue_data.load_glue(GLUE_TASKS["mrpc"], GLUE)          # BOM before "Quality"
    assert mrpc["train"]["label"] == [1, 0, 1, 0]
    assert mrpc["train"][0]["sentence1"].count('"') == 2
    assert mrpc["validation"][0]["sentence2"].startswith('" The foodservice')

    stsb = glue_data.load_glue(GLUE_TASKS["stsb"], GLUE)
    assert stsb["train"]["label"] == pytest.approx([5.0, 3.8, 3.8, 2.6, 4.25])

    qqp = glue_data.load_glue(GLUE_TASKS["qqp"], GLUE)
    assert qqp["train"]["idx"] == [133273, 402555, 360472, 150662]   # malformed row skipped
    assert qqp["train"]["label"] == [0, 1, 0, 1]

    mnli = glue_data.load_glue(GLUE_TASKS["mnli"], GLUE)
    names = GLUE_TASKS["mnli"].label_names
    # gold_label is the last of 16 columns in the dev files, not label1
    assert [names[i] for i in mnli["validation_matched"]["label"]] == ["neutral", "contradiction", "entailment"]
    assert [names[i] for i in mnli["validation_mismatched"]["label"]] == [
        "contradiction", "contradiction", "entailment", "neutral"]
    assert mnli["train"][6]["premise"] == 'The "new" rights are nice enough'

    rte = glue_data.load_glue(GLUE_TASKS["rte"], GLUE)               # label strings -> hub ids
    assert rte["train"]["label"] == [1, 0, 0]          # not_entailment = 1, entailment = 0
    wnli = glue_data.load_glue(GLUE_TASKS["wnli"], GLUE)             # 0/1 in the file
    assert wnli["train"]["label"] == [1, 1, 1, 0]
    qnli = glue_data.load_glue(GLUE_TASKS["qnli"], GLUE)
    assert qnli["validation"]["label"] == [0, 1]

    ax = glue_data.load_glue_ax(GLUE)
    assert len(ax) == 2 and set(ax.column_names) == {"premise", "hypothesis", "idx"}


def test_glue_task_folder_itself_and_clear_errors(tmp_path):
    ds = glue_data.load_glue(GLUE_TASKS["rte"], os.path.join(GLUE, "RTE"))   # the task folder
    assert len(ds["train"]) == 3
    with pytest.raises(ValueError, match="RTE/dev.tsv"):
        glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path / "nope"))
    # dev present, train missing: names the missing file
    shutil.copytree(os.path.join(GLUE, "RTE"), tmp_path / "RTE")
    os.remove(tmp_path / "RTE" / "train.tsv")
    with pytest.raises(ValueError, match="train.tsv"):
        glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path))
    # test files are optional
    shutil.copy(os.path.join(GLUE, "RTE", "train.tsv"), tmp_path / "RTE" / "train.tsv")
    os.remove(tmp_path / "RTE" / "test.tsv")
    assert "test" not in glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path))


def test_task_names_and_unknown_task():
    assert canonical_task_name("SST-2") == "sst2"
    assert canonical_task_name("STS-B") == "stsb"
    assert canonical_task_name("squad2.0") == "squad_v2"
    with pytest.raises(ValueError, match="Valid tasks: cola, sst2"):
        get_task("glue-superb")


def test_squad_loaders_v1_and_v2():
    v1 = squad_data.load_squad(get_task("squad"), SQUAD)
    assert len(v1["train"]) == 5 and len(v1["validation"]) == 3
    assert set(v1["train"].column_names) == {"id", "title", "context", "question", "answers"}
    for row in list(v1["train"]) + list(v1["validation"]):
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start:start + len(text)] == text
    gold = squad_data.gold_answers(v1["validation"])
    assert len(gold["56be4db0acb8001400a502ef"]) == 3

    v2 = squad_data.load_squad(get_task("squad_v2"), SQUAD)
    assert len(v2["train"]) == 5 and len(v2["validation"]) == 4
    gold2 = squad_data.gold_answers(v2["validation"])
    assert gold2["5ad39d53604f3c001a3fe8d2"] == []     # is_impossible: plausible answers not gold
    assert sum(1 for a in gold2.values() if not a) == 2
    with pytest.raises(ValueError, match="train-v2.0.json"):
        squad_data.load_squad(get_task("squad_v2"), os.path.join(GLUE, "RTE"))


def test_hub_path_without_network(monkeypatch):
    """data=None goes to datasets.load_dataset("nyu-mll/glue", task) (stubbed here: tests never
    touch the network) and keeps the task's splits; a hub failure names --data."""
    import datasets

    calls = []

    def fake_load(path, name=None, **kw):
        calls.append((path, name))
        cols = {"premise": ["p"], "hypothesis": ["h"], "label": [0], "idx": [0]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(cols) for s in [
            "train", "validation_matched", "validation_mismatched", "test_matched",
            "test_mismatched"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = glue_data.load_glue(GLUE_TASKS["mnli"])
    assert calls == [("nyu-mll/glue", "mnli")]
    assert set(ds) == {"train", "validation_matched", "validation_mismatched", "test_matched",
                       "test_mismatched"}
    # a local folder takes precedence: the hub is not asked
    glue_data.load_glue(GLUE_TASKS["mnli"], GLUE)
    assert len(calls) == 1

    def offline(*a, **kw):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="--data"):
        glue_data.load_glue(GLUE_TASKS["sst2"])
    with pytest.raises(ValueError, match="train-v1.1.json"):
        squad_data.load_squad(get_task("squad"))
