"""GLUE / SQuAD loaders on fixtures in the exact official formats (tests/fixtures/glue, .../squad).
Nothing here touches the network: a local folder is always passed."""
import json
import os
import re
import shutil

import pytest

from finetune import glue_data, squad_data
from finetune.data_issues import DataIssues
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
    ds = glue_data.load_glue(task, GLUE, skip_malformed=name == "qqp")
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

    # QQP's malformed row: an error naming file and line, or skipped and counted when asked
    qqp_train = os.path.join(GLUE, "QQP", "train.tsv")
    with pytest.raises(ValueError, match=rf"{re.escape(qqp_train)}, line 6: 4 fields where the "
                                         rf"header has 6.*--skip-malformed-rows"):
        glue_data.load_glue(GLUE_TASKS["qqp"], GLUE)
    issues = DataIssues()
    qqp = glue_data.load_glue(GLUE_TASKS["qqp"], GLUE, skip_malformed=True, issues=issues)
    assert qqp["train"]["idx"] == [133273, 402555, 360472, 150662]   # malformed row skipped
    assert qqp["train"]["label"] == [0, 1, 0, 1]
    assert issues.skipped_rows == {qqp_train: 1}

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


def test_ax_found_from_the_mnli_folder_or_its_absence_said(tmp_path, caplog):
    # --data = the MNLI folder itself: the diagnostic set is found beside it, in the GLUE root
    ax = glue_data.load_glue_ax(os.path.join(GLUE, "MNLI"))
    assert ax is not None and len(ax) == 2
    # an MNLI folder alone: no AX, and the log and the run's notes say why
    shutil.copytree(os.path.join(GLUE, "MNLI"), tmp_path / "MNLI")
    issues = DataIssues()
    with caplog.at_level("WARNING"):
        assert glue_data.load_glue_ax(str(tmp_path / "MNLI"), issues) is None
    assert "AX.tsv not written" in caplog.text and "diagnostic.tsv" in caplog.text
    assert len(issues.notes) == 1 and "AX.tsv not written" in issues.notes[0]


def _copy_task(tmp_path, folder):
    shutil.copytree(os.path.join(GLUE, folder), tmp_path / folder)
    return tmp_path / folder


def test_test_rows_with_wrong_field_counts_are_kept_and_counted(tmp_path):
    rte = _copy_task(tmp_path, "RTE")
    with open(rte / "test.tsv", "a", encoding="utf-8") as f:
        f.write("2\tA premise with\ta stray tab.\tThe hypothesis.\n")   # one field too many
        f.write("3\tOnly a premise.\n")                                  # one field short
        f.write("\n")                                                    # blank line: not a row
    issues = DataIssues()
    ds = glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path), issues=issues)
    assert ds["test"]["idx"] == [0, 1, 2, 3]
    assert ds["test"][2]["sentence1"] == "A premise with"
    assert ds["test"][2]["sentence2"] == "a stray tab.\tThe hypothesis."
    assert ds["test"][3]["sentence2"] == ""
    assert issues.repaired_test_rows == {str(rte / "test.tsv"): 2}
    # a test row whose index cannot be read cannot reach the submission: an error, not a drop
    with open(rte / "test.tsv", "a", encoding="utf-8") as f:
        f.write("x\tpremise\thypothesis\n")
    with pytest.raises(ValueError, match=r"test.tsv, line 7: index 'x' is not an integer"):
        glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path))


def test_dev_row_with_unknown_label_fails_or_is_skipped_and_counted(tmp_path):
    rte = _copy_task(tmp_path, "RTE")
    with open(rte / "dev.tsv", "a", encoding="utf-8") as f:
        f.write("9\tA premise.\tA hypothesis.\tmaybe\n")
    dev = str(rte / "dev.tsv")
    with pytest.raises(ValueError, match=rf"{re.escape(dev)}, line 4: unknown label 'maybe'"):
        glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path))
    issues = DataIssues()
    ds = glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path), skip_malformed=True, issues=issues)
    assert len(ds["validation"]) == 2 and issues.skipped_rows == {dev: 1}
    # STS-B: a score that is not a number is a malformed row too, not a bare float() traceback
    stsb = _copy_task(tmp_path, "STS-B")
    lines = open(stsb / "train.tsv", encoding="utf-8").read().splitlines()
    fields = lines[1].split("\t")
    fields[-1] = "high"
    lines[1] = "\t".join(fields)
    (stsb / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train.tsv, line 2: score 'high' is not a number"):
        glue_data.load_glue(GLUE_TASKS["stsb"], str(tmp_path))


def test_file_with_every_row_malformed_fails_naming_it(tmp_path):
    sst = _copy_task(tmp_path, "SST-2")
    train = str(sst / "train.tsv")
    rows = open(train, encoding="utf-8").read().splitlines()
    (sst / "train.tsv").write_text("\n".join([rows[0]] + [r.replace("\t", " ") for r in rows[1:]])
                                   + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(train)}: none of its 6 rows could be read"):
        glue_data.load_glue(GLUE_TASKS["sst2"], str(tmp_path), skip_malformed=True)
    # a test file none of whose rows fits its header is the wrong file, not 2 rows to mend
    test = str(sst / "test.tsv")
    (sst / "test.tsv").write_text(open(os.path.join(GLUE, "SST-2", "test.tsv")).readline() + "".join(
        open(os.path.join(GLUE, "RTE", "test.tsv")).readlines()[1:]), encoding="utf-8")
    shutil.copy(os.path.join(GLUE, "SST-2", "train.tsv"), train)
    with pytest.raises(ValueError, match=rf"{re.escape(test)}: none of its 2 rows could be read"):
        glue_data.load_glue(GLUE_TASKS["sst2"], str(tmp_path))
    (sst / "train.tsv").write_text(rows[0] + "\n", encoding="utf-8")     # header only
    with pytest.raises(ValueError, match=rf"{re.escape(train)} holds no rows"):
        glue_data.load_glue(GLUE_TASKS["sst2"], str(tmp_path))


def test_glue_task_folder_itself_and_clear_errors(tmp_path):
    ds = glue_data.load_glue(GLUE_TASKS["rte"], os.path.join(GLUE, "RTE"))   # the task folder
    assert len(ds["train"]) == 3
    with pytest.raises(ValueError, match="RTE/dev.tsv"):
        glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path / "nope"))
    # RTE/ exists but lacks dev.tsv: that file is what is reported missing
    (tmp_path / "RTE").mkdir()
    shutil.copy(os.path.join(GLUE, "RTE", "train.tsv"), tmp_path / "RTE" / "train.tsv")
    with pytest.raises(ValueError, match=r"Missing GLUE file .*RTE/dev.tsv \(the validation split"):
        glue_data.load_glue(GLUE_TASKS["rte"], str(tmp_path))
    shutil.rmtree(tmp_path / "RTE")
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


# --------------------------------------------------------------- SQuAD: offsets and file errors


def _write_shifted_squad(tmp_path, shift):
    """A copy of the v1.1 train fixture with every answer_start moved by `shift` characters."""
    doc = json.load(open(os.path.join(SQUAD, "train-v1.1.json"), encoding="utf-8"))
    for art in doc["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                for a in qa["answers"]:
                    a["answer_start"] += shift
    shutil.copy(os.path.join(SQUAD, "dev-v1.1.json"), tmp_path / "dev-v1.1.json")
    with open(tmp_path / "train-v1.1.json", "w", encoding="utf-8") as f:
        json.dump(doc, f)
    return str(tmp_path / "train-v1.1.json")


def test_squad_shifted_answer_starts_are_repaired_and_counted(tmp_path):
    path = _write_shifted_squad(tmp_path, 7)
    issues = DataIssues()
    ds = squad_data.load_squad(get_task("squad"), str(tmp_path), issues=issues)
    original = squad_data.load_squad(get_task("squad"), SQUAD)
    assert ds["train"]["answers"] == original["train"]["answers"]       # back at the true spans
    n_answers = sum(len(a["text"]) for a in original["train"]["answers"])
    assert issues.answer_start_repairs == {path: n_answers}
    # the unshifted files need no repair
    clean = DataIssues()
    squad_data.load_squad(get_task("squad"), SQUAD, issues=clean)
    assert clean.to_dict() == {}


def test_squad_answer_start_far_off_names_file_and_question(tmp_path):
    path = _write_shifted_squad(tmp_path, 100)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: question \w+: answer .* is not at"):
        squad_data.load_squad(get_task("squad"), str(tmp_path))
    # In a dev file answer_start is unused (answers are scored by text): counted, not fatal.
    os.replace(path, tmp_path / "dev-v1.1.json")
    issues = DataIssues()
    dev = squad_data.load_squad(get_task("squad"), str(tmp_path), need_train=False, issues=issues)
    assert len(dev["validation"]) == 5
    assert len(issues.notes) == 1 and "answers are not within 32 characters" in issues.notes[0]


def test_squad_features_refuse_a_wrong_answer_start():
    from finetune.squad_features import prepare_features
    from tests.tiny_finetune_models import make_tokenizer

    tok = make_tokenizer(["the cat sat on the mat", "where"])
    with pytest.raises(ValueError, match="answer_start 3 does not point at its answer 'mat'"):
        prepare_features(tok, ["where"], ["the cat sat on the mat"],
                         [{"text": ["mat"], "answer_start": [3]}], 32, 8, 8)


def test_squad_json_errors_name_the_file(tmp_path):
    whole = open(os.path.join(SQUAD, "train-v1.1.json"), encoding="utf-8").read()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(whole[: len(whole) // 2], encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(truncated))} is not valid JSON.*truncated"):
        squad_data.read_squad_json(str(truncated))

    doc = json.loads(whole)
    del doc["data"][1]["paragraphs"]
    no_paragraphs = tmp_path / "no_paragraphs.json"
    no_paragraphs.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(no_paragraphs))}: article 1 has no 'paragraphs'"):
        squad_data.read_squad_json(str(no_paragraphs))

    doc = json.loads(whole)
    del doc["data"][0]["paragraphs"][0]["qas"][1]["question"]
    qid = doc["data"][0]["paragraphs"][0]["qas"][1]["id"]
    no_question = tmp_path / "no_question.json"
    no_question.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(no_question))}: question {qid} has no 'question'"):
        squad_data.read_squad_json(str(no_question))
