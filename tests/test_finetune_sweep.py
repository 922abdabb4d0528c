"""The sweep: an interrupted grid rerun skips finished runs, redoes a crashed one, and gives the
same table as an uninterrupted sweep; grid files, the table's content, clear errors."""
import csv
import json
import os

import pytest

from finetune import sweep
from finetune.__main__ import build_parser
from finetune.cli_args import config_from_args
from finetune.config import FinetuneConfig
from tests.tiny_finetune_models import make_tiny_bert, write_keyword_sst2


pytestmark = pytest.mark.usefixtures("single_torch_thread")


FIX_GLUE = os.path.join(os.path.dirname(__file__), "fixtures", "glue")
OPTIONS = {"max_steps": 3, "batch_size": 8, "max_seq_length": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    words = write_keyword_sst2(str(root / "glue"), n_train=24, n_dev=16)
    model = make_tiny_bert(str(root / "model"), [" ".join(words), open(
        os.path.join(FIX_GLUE, "RTE", "train.tsv")).read()])
    return model, str(root / "glue")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_interrupted_sweep_resumes_and_matches_uninterrupted(setup, tmp_path, capsys):
    model, data = setup
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    # Interrupted: the CLI stops after the first of 3 runs (--max-runs 1).
    rc = sweep.main(["--model", model, "--data", data, "--tasks", "sst2", "--lrs", "1e-3,3e-3",
                     "--seeds", "1", "--output", out_a, "--max-runs", "1", "--max-steps", "3",
                     "--batch-size", "8", "--max-seq-length", "16", "--device", "cpu",
                     "--no-progress"])
    assert rc == 0
    assert "1 completed" in capsys.readouterr().out
    first = os.path.join(out_a, "runs", "sst2", "lr0.001_seed1", "result.json")
    assert os.path.isfile(first)
    assert not os.path.exists(os.path.join(out_a, "runs", "sst2", "lr0.003_seed1", "result.json"))
    mtime = os.stat(first).st_mtime_ns
    partial = list(csv.reader(open(os.path.join(out_a, "results.csv"))))
    assert [r[0] for r in partial[1:]] == ["sst2", "glue_average"]

    # A crashed run leaves a folder without result.json: it must be redone, not skipped.
    crashed = os.path.join(out_a, "runs", "sst2", "lr0.003_seed1")
    os.makedirs(crashed)
    open(os.path.join(crashed, "junk.bin"), "w").write("half-written")

    outcome = sweep.run_sweep(model, out_a, "sst2", [1e-3, 3e-3], [1], data=data,
                              options=OPTIONS, progress=False)
    assert outcome.skipped == [sweep.Run("sst2", 1e-3, 1)]
    assert outcome.completed == [sweep.Run("sst2", 3e-3, 1)]
    assert outcome.done
    assert os.stat(first).st_mtime_ns == mtime                    # finished run untouched
    assert not os.path.exists(os.path.join(crashed, "junk.bin"))   # crashed run redone

    # A third call has nothing to do.
    again = sweep.run_sweep(model, out_a, "sst2", [1e-3, 3e-3], [1], data=data, options=OPTIONS,
                            progress=False)
    assert len(again.skipped) == 2 and not again.completed

    # Uninterrupted sweep from a YAML grid file: same table.
    grid = tmp_path / "grid.yaml"
    grid.write_text("tasks: [sst2]\nlearning_rates: [0.001, 0.003]\nseeds: [1]\n"
                    "options: {max_steps: 3, batch_size: 8, max_seq_length: 16, device: cpu}\n")
    rc = sweep.main(["--grid", str(grid), "--model", model, "--data", data, "--output", out_b,
                     "--no-progress"])
    assert rc == 0
    for name in ("results.csv", "results.md", "results_all.csv"):
        assert _read(os.path.join(out_a, name)) == _read(os.path.join(out_b, name)), name


def test_table_best_lr_mean_std_and_glue_average(setup, tmp_path):
    model, data = setup
    out = str(tmp_path / "t")
    outcome = sweep.run_sweep(model, out, ["sst2", "rte"], [1e-3, 3e-3], [1, 2],
                              data={"sst2": data, "rte": FIX_GLUE}, options=OPTIONS, progress=False)
    assert outcome.done and len(outcome.completed) == 8
    results = {}
    for r in outcome.runs:
        res = json.load(open(os.path.join(out, r.rel_dir, "result.json")))
        results.setdefault((r.task, r.lr), []).append(100 * res["score"])
    rows = {row["task"]: row for row in csv.DictReader(open(os.path.join(out, "results.csv")))}
    bests = {}
    for task in ("sst2", "rte"):
        means = {lr: sum(v) / len(v) for (t, lr), v in results.items() if t == task}
        best_lr = max(means, key=lambda lr: (means[lr], -lr))
        bests[task] = means[best_lr]
        assert float(rows[task]["best_lr"]) == best_lr
        assert float(rows[task]["mean"]) == pytest.approx(means[best_lr], abs=1e-3)
        vals = results[(task, best_lr)]
        std = (sum((v - means[best_lr]) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
        assert float(rows[task]["std"]) == pytest.approx(std, abs=1e-3)
        assert rows[task]["n_seeds"] == "2"
    assert float(rows["glue_average"]["mean"]) == pytest.approx(sum(bests.values()) / 2, abs=1e-3)
    md = _read(os.path.join(out, "results.md"))
    assert "GLUE average" in md and "| rte | accuracy |" in md
    assert outcome.glue_average == pytest.approx(sum(bests.values()) / 2)


def test_sweep_validates_before_running(setup, tmp_path):
    model, data = setup
    with pytest.raises(ValueError, match="Valid tasks"):
        sweep.run_sweep(model, str(tmp_path), ["sst2", "nope"], [1e-3], [1], data=data)
    with pytest.raises(ValueError, match="MRPC"):
        sweep.run_sweep(model, str(tmp_path), ["sst2", "mrpc"], [1e-3], [1], data=data)
    with pytest.raises(ValueError, match="Unknown finetuning option"):
        sweep.run_sweep(model, str(tmp_path), ["sst2"], [1e-3], [1], data=data,
                        options={"epochz": 3})
    assert not os.path.exists(os.path.join(tmp_path, "runs"))


def test_subprocess_command_rebuilds_the_config(tmp_path):
    """One process per device runs `python -m finetune <flags>`: the flags must give back the
    same config."""
    cfg = FinetuneConfig(task="squad_v2", model=str(tmp_path), output=str(tmp_path / "o"),
                         data="d", lr=3e-5, seed=7, bf16=True, freeze_values=True, value_lr=1e-3,
                         max_train_samples=100, predict_test=False, null_score_diff_threshold=-1.5)
    args = build_parser().parse_args(sweep.config_to_cli(cfg))
    assert config_from_args(args) == cfg


def test_one_process_per_device_path(setup, tmp_path):
    """The multi-GPU path (a subprocess per run, a pool of device slots), exercised with two CPU
    slots: both runs finish and the table is written like the in-process path's."""
    model, data = setup
    out = str(tmp_path / "p")
    outcome = sweep.run_sweep(model, out, "sst2", [1e-3, 3e-3], [1], data=data,
                              options={**OPTIONS, "max_steps": 1}, devices="cpu,cpu",
                              progress=False)
    assert outcome.done, outcome.failed
    assert len(outcome.completed) == 2
    for r in outcome.runs:
        assert os.path.isfile(os.path.join(out, r.rel_dir, "log.txt"))
        assert json.load(open(os.path.join(out, r.rel_dir, "result.json")))["device"] == "cpu"
    assert os.path.isfile(os.path.join(out, "results.md"))


def test_failed_run_is_recorded_and_the_grid_goes_on(setup, tmp_path, monkeypatch):
    model, data = setup
    real = sweep._run_in_process

    def flaky(cfg):
        if cfg.lr == 3e-3:
            raise RuntimeError("simulated crash")
        real(cfg)

    monkeypatch.setattr(sweep, "_run_in_process", flaky)
    out = str(tmp_path / "f")
    outcome = sweep.run_sweep(model, out, "sst2", [1e-3, 3e-3, 5e-3], [1], data=data,
                              options=OPTIONS, progress=False)
    assert list(outcome.failed) == [sweep.Run("sst2", 3e-3, 1)]
    assert len(outcome.completed) == 2 and not outcome.done
    assert "simulated crash" in open(os.path.join(out, "runs/sst2/lr0.003_seed1/error.txt")).read()
    # the rerun (crash fixed) redoes only the failed run
    monkeypatch.setattr(sweep, "_run_in_process", real)
    again = sweep.run_sweep(model, out, "sst2", [1e-3, 3e-3, 5e-3], [1], data=data,
                            options=OPTIONS, progress=False)
    assert again.completed == [sweep.Run("sst2", 3e-3, 1)] and again.done


# ------------------------------------------- finished runs keyed by configuration, Ctrl-C, files


def _fake_run(calls):
    """Stands in for a real run: records the call and writes the result.json a run writes (its
    score is epochs / 10, so a table built from the wrong runs shows)."""
    from atomic_files import write_json_atomic

    def run(cfg):
        calls.append(cfg)
        score = cfg.epochs / 10
        write_json_atomic(os.path.join(cfg.output, "result.json"), {
            "task": cfg.task, "lr": cfg.lr, "seed": cfg.seed, "score": score,
            "metrics": {"accuracy": score}, "config": cfg.to_dict()})
    return run


def test_finished_runs_count_only_with_the_same_configuration(setup, tmp_path, monkeypatch, capsys):
    model, data = setup
    calls = []
    monkeypatch.setattr(sweep, "_run_in_process", _fake_run(calls))
    out = str(tmp_path / "s")

    def sweep_with(**kw):
        options = {"epochs": kw.pop("epochs", 1), "device": "cpu", **kw.pop("options", {})}
        return sweep.run_sweep(model, out, "sst2", [1e-3, 3e-3], [1], data=data, options=options,
                               progress=False, **kw)

    assert len(sweep_with().completed) == 2
    # Same options, other device / progress / logging: the finished runs count.
    again = sweep_with(options={"device": None, "log_every_steps": 7})
    assert len(again.skipped) == 2 and not again.completed and len(calls) == 2
    sweep_json = _read(os.path.join(out, "sweep.json"))
    # Other options: refused before anything runs, naming a run and the difference; sweep.json kept.
    with pytest.raises(ValueError, match=r"2 finished run\(s\) .*runs/sst2/lr0.001_seed1 "
                                         r"\(epochs: 1 -> 4\).*--redo-mismatched"):
        sweep_with(epochs=4)
    assert len(calls) == 2 and _read(os.path.join(out, "sweep.json")) == sweep_json
    rc = sweep.main(["--model", model, "--data", data, "--tasks", "sst2", "--lrs", "1e-3,3e-3",
                     "--seeds", "1", "--output", out, "--epochs", "4", "--device", "cpu",
                     "--dry-run"])
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == ["mismatch\truns/sst2/lr0.001_seed1",
                                                    "mismatch\truns/sst2/lr0.003_seed1"]
    # Redone when asked; a mismatched run not redone yet (max_runs) stays out of the table.
    part = sweep_with(epochs=4, redo_mismatched=True, max_runs=1)
    assert part.completed == [sweep.Run("sst2", 1e-3, 1)] and len(calls) == 3
    assert part.table[0]["n_seeds"] == 1 and part.table[0]["lrs_tried"] == [1e-3]
    assert part.glue_average == pytest.approx(40.0)             # the 4-epoch run only
    assert "1 of 2 runs finished" in _read(os.path.join(out, "results.md"))
    rest = sweep_with(epochs=4, redo_mismatched=True)
    assert rest.skipped == [sweep.Run("sst2", 1e-3, 1)] and rest.completed == [sweep.Run("sst2", 3e-3, 1)]
    assert rest.glue_average == pytest.approx(40.0)
    # A result.json without a recorded configuration is not trusted either.
    res_path = os.path.join(out, "runs", "sst2", "lr0.001_seed1", "result.json")
    res = json.load(open(res_path))
    del res["config"]
    json.dump(res, open(res_path, "w"))
    with pytest.raises(ValueError, match="no configuration recorded"):
        sweep_with(epochs=4)


def test_prevalidation_checks_every_file_a_run_needs(setup, tmp_path, monkeypatch):
    import shutil

    model, data = setup
    calls = []
    monkeypatch.setattr(sweep, "_run_in_process", _fake_run(calls))
    glue = tmp_path / "glue"
    shutil.copytree(os.path.join(data, "SST-2"), glue / "SST-2")
    shutil.copytree(os.path.join(FIX_GLUE, "RTE"), glue / "RTE")
    os.remove(glue / "RTE" / "train.tsv")                      # dev.tsv is there, train is not
    with pytest.raises(ValueError, match=r"Missing GLUE file .*RTE/train.tsv"):
        sweep.run_sweep(model, str(tmp_path / "o"), ["sst2", "rte"], [1e-3], [1], data=str(glue),
                        options={"device": "cpu"}, progress=False)
    shutil.copy(os.path.join(FIX_GLUE, "SST-2", "train.tsv"), glue / "RTE" / "train.tsv")
    with pytest.raises(ValueError, match=r"RTE/train.tsv: the header .* is this the official GLUE RTE"):
        sweep.run_sweep(model, str(tmp_path / "o"), ["sst2", "rte"], [1e-3], [1], data=str(glue),
                        options={"device": "cpu"}, progress=False)
    # a malformed row in a train file: its line, before any run
    shutil.copy(os.path.join(FIX_GLUE, "RTE", "train.tsv"), glue / "RTE" / "train.tsv")
    with open(glue / "RTE" / "train.tsv", "a", encoding="utf-8") as f:
        f.write("99\tA premise.\tA hypothesis.\tmaybe\n")
    with pytest.raises(ValueError, match=r"RTE/train.tsv, line 5: unknown label 'maybe'"):
        sweep.run_sweep(model, str(tmp_path / "o"), ["sst2", "rte"], [1e-3], [1], data=str(glue),
                        options={"device": "cpu"}, progress=False)
    # SQuAD: a truncated training file is named before any run
    squad = tmp_path / "squad"
    shutil.copytree(os.path.join(os.path.dirname(FIX_GLUE), "squad"), squad)
    text = (squad / "train-v1.1.json").read_text(encoding="utf-8")
    (squad / "train-v1.1.json").write_text(text[:-40], encoding="utf-8")
    with pytest.raises(ValueError, match=r"train-v1.1.json is not valid JSON"):
        sweep.run_sweep(model, str(tmp_path / "o"), ["squad"], [1e-3], [1], squad_data=str(squad),
                        options={"device": "cpu"}, progress=False)
    assert not calls and not os.path.exists(tmp_path / "o")


def test_ctrl_c_leaves_the_partial_table(setup, tmp_path, monkeypatch, capsys):
    model, data = setup
    calls = []
    finish = _fake_run(calls)

    def interrupted_second(cfg):
        if calls:
            raise KeyboardInterrupt
        finish(cfg)

    monkeypatch.setattr(sweep, "_run_in_process", interrupted_second)
    out = str(tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(model, out, "sst2", [1e-3, 3e-3, 5e-3], [1], data=data,
                        options={"device": "cpu"}, progress=False)
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert [r["task"] for r in rows] == ["sst2", "glue_average"] and rows[0]["best_lr"] == "0.001"
    assert "1 of 3 runs finished" in _read(os.path.join(out, "results.md"))
    assert not os.path.exists(os.path.join(out, "runs", "sst2", "lr0.003_seed1", "result.json"))
    # The CLI says where the table is and exits 130, as a shell does for SIGINT.
    calls.clear()
    rc = sweep.main(["--model", model, "--data", data, "--tasks", "sst2", "--lrs", "1e-3,3e-3",
                     "--seeds", "1", "--output", str(tmp_path / "cli"), "--device", "cpu",
                     "--no-progress"])
    assert rc == 130
    assert "results.md" in capsys.readouterr().err
    assert os.path.isfile(tmp_path / "cli" / "results.md")
