"""The ablation (experiments/ablation*.py): the study grid, its checks, the report, and a tiny run end
to end whose table must equal the runs' own metrics files."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest

from experiments.ablation_study import check_inputs, expand_runs, load_study

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STUDY = os.path.join(REPO_ROOT, "configs", "ablation_minilm_cpu.json")
GPU_STUDY = os.path.join(REPO_ROOT, "configs", "ablation_bert_base_gpu.json")


def _args(**kw) -> argparse.Namespace:
    values = dict(steps=None, quick=False, only="", procs=0, seeds=None)
    values.update(kw)
    return argparse.Namespace(**values)


def _write_study(tmp_path, **changes) -> str:
    with open(DEFAULT_STUDY, encoding="utf-8") as f:
        study = json.load(f)
    study.update(changes)
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study))
    return str(path)


# --------------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------------


def test_grid_is_the_cartesian_product_in_axis_order_plus_extra_runs():
    runs = expand_runs(
        {"memory": {"replace": {"model.overrides.memory_mode": "replace"},
                    "residual": {"model.overrides.memory_mode": "residual"}},
         "init": {"scratch": {"model.init_from": None}, "init": {"model.init_from": "m", "train.seed": 3}}},
        {"baseline": {"model.overrides.memory_layers": []}})
    assert list(runs) == ["replace_scratch", "replace_init", "residual_scratch", "residual_init", "baseline"]
    assert runs["residual_init"] == {"model.overrides.memory_mode": "residual", "model.init_from": "m", "train.seed": 3}
    assert runs["baseline"] == {"model.overrides.memory_layers": []}


def test_default_study_runs_share_everything_but_the_grid():
    """Same shards, steps, seed, batch and memory size; scratch has MiniLM's architecture."""
    from pretrain.config import config_from_dict
    from experiments.demo import minilm_dir
    from pretrain.main import _model_config

    study = load_study(DEFAULT_STUDY, "/tmp/ablation_unit", _args())
    assert list(study.runs) == ["replace_scratch", "replace_init", "residual_scratch", "residual_init", "baseline"]
    with open(os.path.join(minilm_dir(), "config.json"), encoding="utf-8") as f:
        minilm = json.load(f)
    arch = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps")
    memory = ("memory_layers", "mem_n_keys", "mem_heads", "mem_knn", "mem_k_dim", "mem_query_norm", "mem_value_init")
    configs = {}
    for name, run in study.runs.items():
        mc = _model_config(config_from_dict(run), minilm["vocab_size"], run["data"]["max_seq_len"], study.procs)
        configs[name] = mc
        assert {k: getattr(mc, k) for k in arch} == {k: minilm[k] for k in arch}, name
    mems = {name: json.dumps([getattr(configs[name], k) for k in memory]) for name in study.runs if name != "baseline"}
    assert len(set(mems.values())) == 1 and json.loads(mems["replace_init"])[:2] == [[3], 128]
    assert configs["baseline"].memory_layers == []
    assert {n: configs[n].memory_mode for n in mems} == {"replace_scratch": "replace", "replace_init": "replace",
                                                          "residual_scratch": "residual", "residual_init": "residual"}
    assert [n for n, r in study.runs.items() if r["model"]["init_from"]] == ["replace_init", "residual_init", "baseline"]
    for name, run in study.runs.items():
        assert run["train"]["out_dir"] == os.path.join("/tmp/ablation_unit", "runs", name)
        for section in ("data", "optim"):
            assert run[section] == study.runs["baseline"][section], (name, section)
        assert ({k: v for k, v in run["train"].items() if k != "out_dir"}
                == {k: v for k, v in study.runs["baseline"]["train"].items() if k != "out_dir"})
    assert study.runs["baseline"]["train"]["max_steps"] == 200 and study.seeds == [1, 2]


def test_steps_and_only_select_from_the_study():
    study = load_study(DEFAULT_STUDY, "/tmp/ablation_unit", _args(steps=40, only="residual_init,baseline"))
    assert list(study.runs) == ["residual_init", "baseline"]
    assert {r["train"]["max_steps"] for r in study.runs.values()} == {40}


def test_gpu_study_is_bert_base_and_reports_missing_inputs_before_training():
    study = load_study(GPU_STUDY, "/tmp/ablation_gpu", _args())
    assert len(study.runs) == 5 and study.procs == 8 and study.ds_config.endswith("zero2_bf16.json")
    assert study.runs["replace_scratch"]["model"]["preset"] == "bert-base"
    assert study.runs["residual_init"]["model"]["init_from"] == "models/bert-base-uncased"
    assert {r["train"]["max_steps"] for r in study.runs.values()} == {50000}
    assert [t["task"] for t in study.tasks] == ["rte", "mrpc", "stsb", "sst2", "squad"]
    with pytest.raises(ValueError, match="data.shard_dir 'data/wiki_bert_base' holds no prepared shards"):
        check_inputs(study)


@pytest.mark.parametrize("change, message", [
    ({"grids": {}}, "unknown key 'grids'"),
    ({"common": {"model_overrides.mem_n_keys": 4}}, "not a run-config key"),
    ({"finetune": {"seeds": [1], "tasks": "heldout"}}, "at least 2 integer seeds"),
    ({"extra_runs": {"replace_init": {}}}, "has the name of a grid run"),
    ({"common": {"train.max_steps": -3}}, "run 'replace_scratch': train.max_steps must be positive"),
    ({"finetune": {"seeds": [1, 2], "tasks": [{"name": "x", "task": "rte"}]}}, "needs name, task and lr"),
])
def test_bad_study_is_a_clear_error(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_study(_write_study(tmp_path, **change), str(tmp_path / "out"), _args())


def test_unknown_run_in_only_is_a_clear_error():
    with pytest.raises(ValueError, match="--only names unknown run 'residual'"):
        load_study(DEFAULT_STUDY, "/tmp/ablation_unit", _args(only="residual"))


def test_missing_init_model_is_reported_by_run(tmp_path):
    study = load_study(_write_study(tmp_path, extra_runs={"baseline": {"model.init_from": str(tmp_path / "nope")}}),
                       str(tmp_path / "out"), _args())
    with pytest.raises(ValueError, match="run 'baseline': model.init_from .* is not a Hugging Face model folder"):
        check_inputs(study)


# --------------------------------------------------------------------------------------------------
# the stage runner the demo and the ablation share
# --------------------------------------------------------------------------------------------------


def test_stages_run_once_and_a_rerun_with_other_settings_is_refused(tmp_path, capsys):
    from experiments.demo import run_stages

    calls = []

    def stage(out, args):
        calls.append(args.tag)
        return {"value": 1}

    stages = [("one", stage), ("two", stage)]
    run_stages(str(tmp_path), stages, argparse.Namespace(tag="a"), {"k": 1}, tag="t")
    run_stages(str(tmp_path), stages, argparse.Namespace(tag="b"), {"k": 1}, tag="t")
    assert calls == ["a", "a"]
    assert capsys.readouterr().out.count("done before, reusing") == 2
    assert json.loads((tmp_path / "stages" / "two.json").read_text())["value"] == 1
    with pytest.raises(ValueError, match="holds a t run with other settings"):
        run_stages(str(tmp_path), stages, argparse.Namespace(tag="c"), {"k": 2}, tag="t")


# --------------------------------------------------------------------------------------------------
# the report's computations
# --------------------------------------------------------------------------------------------------


def _run(loss, top1, score, memory=True):
    mem = {"layer3": {"usage": 0.5, "top1_usage": top1, "kl_uniform": 1.0, "gini": 0.4, "stale_frac": 0.1}}
    return {"pretrain": {"step": 10, "mlm_loss": loss, "mlm_acc": 0.3, "eval_tokens": 100.0,
                         "memory": mem if memory else {}},
            "finetune": {"pairs": {"metric": "f1/accuracy", "mean": score, "std": 1.5}}}


def test_axis_effects_are_differences_at_fixed_other_axes():
    from experiments.ablation_report import axis_effects

    runs = {"replace_scratch": _run(7.0, 0.2, 50.0), "replace_init": _run(3.0, 0.6, 70.0),
            "residual_scratch": _run(6.5, 0.3, 52.0), "residual_init": _run(2.5, 0.9, 75.0)}
    grid = {"memory": {"replace": {}, "residual": {}}, "init": {"scratch": {}, "init": {}}}
    lines = axis_effects(runs, grid, [{"name": "pairs"}])
    assert len(lines) == 4
    assert lines[0].startswith("- **memory: residual - replace** (at scratch): MLM loss -0.5000")
    assert "top-1 usage +0.1000" in lines[0] and "pairs +2.00" in lines[0]
    assert lines[3].startswith("- **init: init - scratch** (at residual): MLM loss -4.0000")
    assert "top-1 usage +0.6000" in lines[3] and "pairs +23.00" in lines[3]


def test_table_marks_a_memory_less_run_not_applicable():
    from experiments.ablation_report import results_table

    lines = results_table({"residual_init": _run(2.5, 0.9, 75.0), "baseline": _run(2.4, 0, 74.0, memory=False)},
                          [{"name": "pairs"}])
    assert lines[0] == ("| run | MLM loss | MLM acc | usage | top-1 usage | KL (nats) | Gini | stale | "
                        "pairs (f1/accuracy) |")
    assert lines[2] == "| residual_init | 2.5000 | 0.3000 | 0.5000 | 0.9000 | 1.0000 | 0.4000 | 0.1000 | 75.00 ± 1.50 |"
    assert lines[3] == "| baseline | 2.4000 | 0.3000 | n/a | n/a | n/a | n/a | n/a | 74.00 ± 1.50 |"


def test_plot_series_put_every_run_with_a_memory_on_the_same_axes():
    from experiments.ablation_report import _plot_series

    records = {
        "a": [{"kind": "eval", "step": 5, "loss": 3.0, "memory/layer3/usage": 0.4},
              {"kind": "train", "step": 5, "loss": 9.0, "memory/layer3/usage": 0.9},
              {"kind": "eval", "step": 10, "loss": 2.0, "memory/layer3/usage": 0.5}],
        "baseline": [{"kind": "eval", "step": 5, "loss": 2.5}, {"kind": "eval", "step": 10, "loss": 2.4}],
    }
    assert _plot_series(records, "eval", "memory:usage") == {"a": ([5, 10], [0.4, 0.5])}
    assert _plot_series(records, "eval", "loss") == {"a": ([5, 10], [3.0, 2.0]), "baseline": ([5, 10], [2.5, 2.4])}


# --------------------------------------------------------------------------------------------------
# end to end: every number of the table equals the runs' own files
# --------------------------------------------------------------------------------------------------

_COLUMN_METRIC = {"usage": "usage", "top-1 usage": "top1_usage", "KL (nats)": "kl_uniform", "Gini": "gini",
                  "stale": "stale_frac"}


def _markdown_table(text: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")])))
    return rows


def _final_eval(metrics_path: str) -> dict:
    with open(metrics_path, encoding="utf-8") as f:
        evals = [r for r in map(json.loads, f) if r.get("kind") == "eval"]
    return max(evals, key=lambda r: r["step"])


def _finetune_scores(out, run: str, task_name: str, task: str) -> list[float]:
    folder = os.path.join(out, "finetune", run, task_name, "runs", task)
    scores = []
    for seed_dir in sorted(os.listdir(folder)):
        with open(os.path.join(folder, seed_dir, "result.json"), encoding="utf-8") as f:
            result = json.load(f)
        scores.append(result["score"] * (100.0 if task == "mrpc" else 1.0))
    return scores


@pytest.mark.slow
def test_quick_ablation_end_to_end_table_equals_the_runs_files(tmp_path):
    out = tmp_path / "ablation"
    # a scratch run and the memory-less baseline: both model paths, memory and "n/a" cells
    cmd = [sys.executable, "-m", "experiments.ablation", "--out", str(out), "--quick", "--steps", "3",
           "--max-articles", "24", "--only", "residual_scratch,baseline"]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, timeout=2400)
    report = (out / "report" / "README.md").read_text()
    results = json.loads((out / "report" / "results.json").read_text())
    rows = _markdown_table(report)
    assert [r["run"] for r in rows] == ["residual_scratch", "baseline"] == list(results["runs"])
    tasks = {t["name"]: t["task"] for t in results["tasks"]}
    assert tasks == {"pairs": "mrpc", "qa": "squad"}
    for row in rows:
        name = row["run"]
        metrics_path = out / "runs" / name / "metrics.jsonl"
        final = _final_eval(str(metrics_path))
        assert final["step"] == 3
        summary = results["runs"][name]
        # the JSON holds the files' numbers exactly, the table rounded to its 4 decimals
        assert summary["pretrain"]["mlm_loss"] == final["loss"] and summary["pretrain"]["mlm_acc"] == final["mlm_acc"]
        assert float(row["MLM loss"]) == pytest.approx(final["loss"], abs=5e-5)
        assert float(row["MLM acc"]) == pytest.approx(final["mlm_acc"], abs=5e-5)
        for column, metric in _COLUMN_METRIC.items():
            key = f"memory/layer3/{metric}"
            if name == "baseline":
                assert row[column] == "n/a" and key not in final
                continue
            assert summary["pretrain"]["memory"]["layer3"][metric] == final[key]
            assert float(row[column]) == pytest.approx(final[key], abs=5e-5), (name, column)
        for task_name, task in tasks.items():
            scores = _finetune_scores(str(out), name, task_name, task)
            assert len(scores) == 2  # one result.json per seed
            column = next(c for c in row if c.startswith(task_name + " ("))
            mean, std = (float(x) for x in re.match(r"(-?[\d.]+) ± ([\d.]+)", row[column]).groups())
            assert mean == pytest.approx(statistics.mean(scores), abs=0.005)
            assert std == pytest.approx(statistics.stdev(scores), abs=0.005)
            assert summary["finetune"][task_name]["scores"] == pytest.approx(scores, rel=1e-12)
            assert math.isclose(summary["finetune"][task_name]["mean"], statistics.mean(scores), rel_tol=1e-9)
    for plot in ("usage.png", "top1_usage.png", "stale_frac.png", "mlm_loss.png", "train_loss.png"):
        assert (out / "report" / plot).stat().st_size > 1000 and plot in report
    assert "`python -m experiments.ablation --out" in report and "| `train.max_steps` | `3` |" in report

    rerun = subprocess.run(cmd, cwd=REPO_ROOT, check=True, timeout=300, capture_output=True, text=True)
    assert rerun.stdout.count("done before, reusing") == 9  # prep, tasks, 2 x (pretrain, convert, finetune), report
