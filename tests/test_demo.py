"""The demo's held-out tasks, and a small form of the whole demo (few steps) end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from experiments.demo_tasks import Document, build_cloze_qa, build_pair_examples, split_sentences, write_heldout_tasks

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARTICLES = [
    Document(f"a{i}", f"The town of Alder{i} was founded in {1800 + i} by settlers. It lies on the river Brook{i}. "
                      f"Its main industry is weaving for Market{i}. In {1900 + i} the railway reached Alder{i}. "
                      f"Today about {1000 + i} people live there.")
    for i in range(6)
]


def test_split_sentences_keeps_whole_sentences():
    sentences = split_sentences(ARTICLES[0].text)
    assert sentences[0] == "The town of Alder0 was founded in 1800 by settlers."
    assert len(sentences) == 5


def test_pair_examples_positive_pairs_are_consecutive_and_balanced():
    examples = build_pair_examples(ARTICLES, random.Random(0))
    positives = [e for e in examples if e[0] == 1]
    negatives = [e for e in examples if e[0] == 0]
    assert len(positives) == len(negatives) == 6 * 4
    by_doc = [split_sentences(d.text) for d in ARTICLES]
    consecutive = {(s[i], s[i + 1]) for s in by_doc for i in range(len(s) - 1)}
    assert all((a, b) in consecutive for _, a, b in positives)
    # a negative's second sentence comes from another article
    owner = {s: n for n, sents in enumerate(by_doc) for s in sents}
    assert all(owner[a] != owner[b] for _, a, b in negatives)


def test_cloze_answers_sit_at_their_offsets_and_are_removed_from_the_question():
    articles = build_cloze_qa(ARTICLES, random.Random(0))
    n = 0
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answer = qa["answers"][0]
                start = answer["answer_start"]
                assert paragraph["context"][start:start + len(answer["text"])] == answer["text"]
                assert "what" in qa["question"] and qa["question"].endswith("?")
                n += 1
    assert n >= 6 * 3  # three sentences per article carry a number


def test_heldout_tasks_split_by_document(tmp_path):
    counts = write_heldout_tasks(ARTICLES, str(tmp_path), seed=3)
    assert counts["dev"]["documents"] + counts["train"]["documents"] == len(ARTICLES)
    with open(tmp_path / "glue" / "MRPC" / "train.tsv", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [line.rstrip("\n").split("\t") for line in f]
    assert header == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    assert len(rows) == counts["train"]["pairs"] and all(len(r) == 5 for r in rows)
    train = json.loads((tmp_path / "squad" / "train-v1.1.json").read_text())
    dev = json.loads((tmp_path / "squad" / "dev-v1.1.json").read_text())
    assert {a["title"] for a in train["data"]}.isdisjoint({a["title"] for a in dev["data"]})


def test_too_few_documents_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="at least 4 held-out documents"):
        write_heldout_tasks(ARTICLES[:2], str(tmp_path))


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun_reuses_stages(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "experiments.demo", "--out", str(out), "--quick", "--steps", "6", "--max-articles", "24"]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, timeout=900)
    report = (out / "report" / "README.md").read_text()
    for plot in ("train_loss.png", "memory_usage.png", "staleness.png", "slot_histogram.png"):
        assert (out / "report" / plot).stat().st_size > 1000
        assert plot in report
    stages = {p.stem for p in (out / "stages").glob("*.json")}
    assert {"prep", "tasks", "pretrain", "convert", "finetune", "report"} <= stages
    finetune = json.loads((out / "stages" / "finetune.json").read_text())
    assert set(finetune) >= {"bert_pkm", "minilm_baseline"}
    # the converted model is a BERT+PKM that the Auto classes load
    config = json.loads((out / "hf_model" / "config.json").read_text())
    assert config["model_type"] == "bert_pkm" and config["memory_mode"] == "residual"

    rerun = subprocess.run(cmd, cwd=REPO_ROOT, check=True, timeout=300, capture_output=True, text=True)
    assert rerun.stdout.count("done before, reusing") == 6


def test_fresh_deletes_only_a_folder_the_stages_wrote(tmp_path, capsys):
    from experiments.demo import main as demo_main
    from experiments.demo import start_fresh

    unrelated = tmp_path / "thesis"
    unrelated.mkdir()
    (unrelated / "chapter1.tex").write_text("precious")
    assert demo_main(["--out", str(unrelated), "--fresh"]) == 2  # refused before any work
    assert "not a demo output folder" in capsys.readouterr().err
    assert (unrelated / "chapter1.tex").read_text() == "precious"

    ours = tmp_path / "demo_out"
    (ours / "stages").mkdir(parents=True)
    (ours / "stages" / "settings.json").write_text("{}")
    (ours / "shards").mkdir()
    start_fresh(str(ours), "demo")
    assert not ours.exists()
    start_fresh(str(tmp_path / "missing"), "demo")  # nothing to delete: fine
