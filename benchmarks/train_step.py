"""Training-step throughput: plain Hugging Face BERT vs ours without and with a PKM memory.

    python benchmarks/train_step.py                         # CPU: small BERT (hidden 256, 4 layers), seq 128
    python benchmarks/train_step.py --models tiny --micro 4 --seq 32 --steps 2 --warmup 1   # seconds (the test)
    python benchmarks/train_step.py --gpu --models large --gpu-micro 64,256 --json out.json   # one GPU, bf16

Rows, each at the same shape (model size, micro-batch, sequence length) on one device:
  * ``hf``: plain ``transformers.BertForMaskedLM`` (attn_implementation="sdpa", bf16 autocast,
    torch.optim.AdamW with fused=True on CUDA, grad-norm clipping at 1.0, no DeepSpeed): what a
    user would write instead of this project;
  * ``ours``: the real training step of pretrain/ (``Trainer.train_step``: DeepSpeed engine for the
    dense part) with ``memory_layers=[]``;
  * ``ours_pkm``: the same with one residual PKM memory (ResM; N = n^2 slots, H heads, top-k) in the
    middle layer: column-sharded value table + SparseAdam + value clipping + staleness marks.
Columns: ms/step, seq/s, tokens/s, model TFLOP/s, MFU and peak memory. MFU uses the one formula of
``pretrain/throughput.py`` (printed with the table): FLOPs/sequence = (6 x non-embedding params +
12*s*d*L) x s, over ``--peak-tflops`` (default 790: the bf16 matmul rate measured on one H200).
Peak memory: ``torch.cuda.max_memory_allocated`` while timing the row at that micro-batch, less what
was allocated before the row was built (CUDA); the process's resident set size after the row (CPU).

Synthetic MLM batches (15% of positions predicted, no padding; the index lists of masked positions
and tokens made on the host like the real collate) are pre-built and pinned. Each row is built once,
timed at each micro-batch in increasing order (``warmup`` steps, then ``steps`` steps between two
device synchronisations: the time includes whatever the host adds between steps) and freed; a
micro-batch that runs out of memory prints "OOM", and the larger ones of that row are skipped.
``--check-syncs`` also runs one more step of each row under a detector of host-device syncs
(``HostSyncDetector``) and reports where they come from.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pretrain.throughput import FLOP_FORMULA, flops_per_sequence, non_embedding_params, throughput_metrics  # noqa: E402

ROWS = ("hf", "ours", "ours_pkm")
ROW_TITLES = {"hf": "plain HF BertForMaskedLM", "ours": "ours, memory-less", "ours_pkm": "ours + PKM"}
# BERT sizes (hidden, layers, heads, intermediate); "small" takes --hidden/--layers
MODEL_SIZES = {"tiny": (64, 2, 2, 256), "base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}


# --------------------------------------------------------------------------------------------------
# Host-sync detector
# --------------------------------------------------------------------------------------------------


class HostSyncDetector(TorchDispatchMode):
    """Records every op that makes the host wait for the device, and the source line that asked.

    Caught: ``.item()``/``float()``/``bool()`` of a tensor (aten._local_scalar_dense), ``nonzero``,
    ``masked_select``, ``unique``/``unique_consecutive`` and ``bincount`` (their output sizes are data
    dependent), indexing with a boolean mask (likewise), and ``Tensor.tolist``. On a CPU these are not syncs, but they are the same calls that stall a GPU, so
    the detector finds them without one. ``where`` is the innermost frame outside torch itself:
    a repository path relative to the repo root (``pkm/memory.py:123``), or another library's file.
    """

    _SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "unique_consecutive",
                 "_unique", "_unique2", "unique_dim", "unique_dim_consecutive", "bincount")
    _INDEX_OPS = ("index", "index_put", "index_put_")

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, str]] = []
        self._tolist = None

    def __enter__(self):
        detector = self
        original = torch.Tensor.tolist
        self._tolist = original

        def tolist(tensor, *args, **kwargs):
            detector._record("Tensor.tolist")
            return original(tensor, *args, **kwargs)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def _record(self, op: str) -> None:
        self.events.append({"op": op, "where": _culprit()})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self._SYNC_OPS:
            self._record(name)
        elif name in self._INDEX_OPS and len(args) > 1 and any(
                isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in (args[1] or ())):
            self._record(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


_DETECTOR_FRAMES = ("_culprit", "_record", "tolist", "__torch_dispatch__")


def _culprit() -> str:
    """The innermost stack frame that is not torch's own code nor this detector."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith(_TORCH_DIR) or (path == here and frame.name in _DETECTOR_FRAMES):
            continue
        rel = os.path.relpath(path, REPO)
        return f"{rel if not rel.startswith('..') else path}:{frame.lineno}"
    return "?"


# --------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------


def synthetic_batches(vocab: int, micro: int, seq: int, count: int, pin: bool, seed: int = 0) -> list[dict]:
    """``count`` MLM micro-batches (15% predicted; 80/10/10 is irrelevant for speed: all [MASK]),
    with the host-made index lists of the real collate (pretrain.data.add_positions)."""
    from pretrain.data import add_positions

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(min(1000, vocab // 2), vocab, (micro, seq), generator=g)  # no special ids
        select = torch.rand(micro, seq, generator=g) < 0.15
        batch = {"input_ids": torch.where(select, torch.full_like(ids, 103), ids),
                 "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                 "labels": torch.where(select, ids, torch.full_like(ids, -100))}
        batch = add_positions(batch)
        out.append({k: v.pin_memory() for k, v in batch.items()} if pin else batch)
    return out


class CyclingStream:
    """The TrainStream interface the Trainer reads, cycling over pre-built batches."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.i, self.epoch = batches, 0, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self) -> dict:
        return {}


# --------------------------------------------------------------------------------------------------
# The three rows
# --------------------------------------------------------------------------------------------------


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    seq: int


@dataclass
class Built:
    """One row, ready to step: ``step()`` runs one training step; ``set_batches`` swaps the data."""

    step: Callable[[], None]
    set_batches: Callable[[list[dict]], None]
    module: torch.nn.Module  # for the parameter count
    close: Callable[[], None]


def build_hf(shape: Shape, device: torch.device, bf16: bool, compile_layers: bool) -> Built:
    """Plain Hugging Face BertForMaskedLM + torch AdamW, bf16 autocast; no DeepSpeed."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                        max_position_embeddings=max(512, shape.seq))
    model = BertForMaskedLM(config)
    model.set_attn_implementation("sdpa")
    model.to(device).train()
    if compile_layers:
        for layer in model.bert.encoder.layer:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    state = {"batches": [], "i": 0}
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")

    def step() -> None:
        batch = state["batches"][state["i"] % len(state["batches"])]
        state["i"] += 1
        inputs = {k: batch[k].to(device, non_blocking=True) for k in keys}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def set_batches(batches: list[dict]) -> None:
        state["batches"], state["i"] = batches, 0

    return Built(step, set_batches, model, lambda: None)


def _ds_config(cfg, micro: int, precision: str, on_gpu: bool, ds_path: str | None) -> dict:
    from pretrain.main import resolve_ds_config

    if ds_path:
        with open(ds_path, encoding="utf-8") as f:
            ds = json.load(f)
        for key in ("train_batch_size", "gradient_accumulation_steps"):
            ds.pop(key, None)
    else:  # the engine of the original measurement (issue 12)
        ds = {"zero_optimization": {"stage": 2, "overlap_comm": on_gpu, "contiguous_gradients": True}}
        if precision == "bf16":
            ds["bf16"] = {"enabled": True}
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = 1
    return resolve_ds_config(cfg, ds, world_size=1, on_gpu=on_gpu, ds_name=ds_path or "the benchmark's ZeRO-2 config")


def build_ours(shape: Shape, with_memory: bool, memory: dict, device: torch.device, precision: str, micro: int,
               compile_layers: bool, ds_path: str | None) -> Built:
    """The real Trainer.train_step on a DeepSpeed engine, with or without one ResM memory."""
    from pkm.modeling import BertPkmForMaskedLM
    from pkm.presets import preset_config
    from pretrain.config import load_config
    from pretrain.engine import build_engine
    from pretrain.trainer import Trainer, seed_everything

    out_dir = tempfile.mkdtemp(prefix="bench_train_step_")
    cfg = load_config(None, [("train.out_dir", out_dir), ("train.tensorboard", False),
                             ("train.max_steps", 10**6), ("train.log_every", 10**6),
                             ("optim.value_grad_clip", 1.0), ("data.max_seq_len", shape.seq),
                             ("train.compile", compile_layers)])
    kwargs = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                  max_position_embeddings=max(512, shape.seq),
                  memory_layers=[(shape.layers - 1) // 2] if with_memory else [], **memory)
    seed_everything(0)
    model = BertPkmForMaskedLM(preset_config("bert-base", **kwargs), external_values=True)  # build_engine attaches
    model.set_attn_implementation(cfg.model.attn_implementation)
    model.train()
    ds = _ds_config(cfg, micro, precision, device.type == "cuda", ds_path)
    engine, values = build_engine(model, cfg, ds, device)
    if engine.device != device:
        raise RuntimeError(f"DeepSpeed put the engine on {engine.device}, not on {device}: run the CPU rows "
                           "with DS_ACCELERATOR=cpu (set by --device cpu) or choose --device cuda.")
    stream = CyclingStream([])
    trainer = Trainer(cfg, engine, values, stream, None)
    trainer.logger.setLevel("WARNING")

    def set_batches(batches: list[dict]) -> None:
        stream.batches, stream.i = batches, 0

    def close() -> None:
        trainer.metrics.close()
        try:  # releases the engine's hooks and buffers; a failure here must not lose the other rows
            if hasattr(engine, "destroy"):
                engine.destroy()
        except Exception as e:  # noqa: BLE001
            print(f"# warning: engine.destroy() failed ({type(e).__name__}: {e}); memory may stay held", flush=True)

    return Built(trainer.train_step, set_batches, engine.module, close)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _rss_gib() -> float:
    """Resident set size of this process (Linux /proc; 0 when unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return 0.0


def time_row(built: Built, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step: ``steps`` steps between two device synchronisations, after ``warmup``."""
    for _ in range(warmup):
        built.step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        built.step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def build_row(row: str, shape: Shape, args, device: torch.device, precision: str, micro: int) -> Built:
    if row == "hf":
        return build_hf(shape, device, precision == "bf16", args.compile)
    memory = {"mem_n_keys": args.n_keys, "mem_heads": args.mem_heads, "mem_knn": args.mem_knn}
    return build_ours(shape, row == "ours_pkm", memory, device, precision, micro, args.compile, args.ds_config)


def run_interleaved(shape: Shape, args, device: torch.device, precision: str, micros: list[int]) -> list[dict]:
    """CPU on a shared machine: every row built first, then stepped in turn (hf, ours, ours_pkm, hf,
    ...) so that load from other jobs hits all alike; the median step is reported."""
    import statistics

    built = {row: build_row(row, shape, args, device, precision, micros[0]) for row in args.rows}
    results = []
    try:
        for micro in micros:
            times: dict[str, list[float]] = {row: [] for row in built}
            for b in built.values():
                b.set_batches(synthetic_batches(shape.vocab, micro, shape.seq, 4, device.type == "cuda"))
            for i in range(args.warmup + args.steps):
                for row, b in built.items():
                    step_s = time_row(b, device, 0, 1)
                    if i >= args.warmup:
                        times[row].append(step_s)
            for row, b in built.items():
                n_params = non_embedding_params(b.module)
                flops = flops_per_sequence(n_params, shape.seq, shape.hidden, shape.layers)
                step_s = statistics.median(times[row])
                res = {"row": row, "title": ROW_TITLES[row], "model": args.current_model, "precision": precision,
                       "seq": shape.seq, "hidden": shape.hidden, "layers": shape.layers, "device": str(device),
                       "micro_batch": micro, "non_embedding_params": n_params, "flops_per_seq": flops,
                       "status": "ok", "ms_per_step": step_s * 1e3, "ms_per_step_min": min(times[row]) * 1e3,
                       "peak_mem_gib": _rss_gib(),
                       **throughput_metrics(micro, micro * shape.seq, step_s, flops, args.peak_tflops)}
                results.append(res)
                print("# measured: " + _table_line(res), flush=True)
    finally:
        for b in built.values():
            b.close()
    return results


def run_row(row: str, shape: Shape, args, device: torch.device, precision: str, micros: list[int]) -> list[dict]:
    """Build one row, time it at each micro-batch (increasing; stop at the first OOM), free it."""
    results: list[dict] = []
    base = {"row": row, "title": ROW_TITLES[row], "model": args.current_model, "precision": precision,
            "seq": shape.seq, "hidden": shape.hidden, "layers": shape.layers, "device": str(device)}
    # memory still held by earlier rows (a leak would show here) is not this row's
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    base["mem_baseline_gib"] = baseline / 2**30
    built = None
    try:
        built = build_row(row, shape, args, device, precision, micros[0])
        n_params = non_embedding_params(built.module)
        flops = flops_per_sequence(n_params, shape.seq, shape.hidden, shape.layers)
        for i, micro in enumerate(micros):
            res = {**base, "micro_batch": micro, "non_embedding_params": n_params, "flops_per_seq": flops}
            try:
                built.set_batches(synthetic_batches(shape.vocab, micro, shape.seq, 4, device.type == "cuda"))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)  # the row's static memory stays counted
                step_s = time_row(built, device, args.warmup, args.steps)
                rates = throughput_metrics(micro, micro * shape.seq, step_s, flops, args.peak_tflops)
                if device.type == "cuda":
                    peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**30
                else:
                    peak = _rss_gib()
                res.update(status="ok", ms_per_step=step_s * 1e3, peak_mem_gib=peak, **rates)
                # diagnostics after the timing: a failure is reported in the row, the numbers are kept
                if args.check_syncs and i == 0:
                    res["host_syncs"] = _diagnostic(check_syncs, built)
                if args.profile:
                    res["profile"] = _diagnostic(profile_steps, built, device, args.profile,
                                                 f"{args.current_model}_{row}_micro{micro}")
            except Exception as e:  # noqa: BLE001 - an OOM row is reported, anything else re-raised
                if not _is_oom(e):
                    raise
                res.update(status="OOM")
                results.append(res)
                results.extend({**base, "micro_batch": m, "status": "OOM (skipped after a smaller OOM)"}
                               for m in micros[i + 1:])
                break
            results.append(res)
            print("# measured: " + _table_line(res), flush=True)  # progress (the table follows at the end)
    except Exception as e:  # noqa: BLE001
        if not _is_oom(e):
            raise
        done = {r["micro_batch"] for r in results}
        results.extend({**base, "micro_batch": m, "status": "OOM"} for m in micros if m not in done)
    finally:
        if built is not None:
            built.close()
        del built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def profile_steps(built: Built, device: torch.device, folder: str, name: str, steps: int = 3) -> str:
    """torch.profiler over ``steps`` more steps; writes the key_averages table (by device time on
    CUDA, CPU time otherwise) to ``folder/name.txt`` and returns its path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            built.step()
        _sync(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# {steps} steps of {name}, sorted by {sort_by}\n")
        f.write(prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=70))
    return path


def _diagnostic(fn: Callable, *args) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            raise
        print(f"# warning: {fn.__name__} failed: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}


def check_syncs(built: Built) -> list[dict[str, str]]:
    """The host syncs of one more (non-log) step, with their source lines."""
    detector = HostSyncDetector()
    with detector:
        built.step()
    return detector.events


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

_HEADER = ("| model | row | micro | ms/step | seq/s | tokens/s | model TFLOP/s | MFU | peak mem (GiB) |\n"
           "|---|---|---:|---:|---:|---:|---:|---:|---:|")


def _table_line(r: dict) -> str:
    if r.get("status") != "ok":
        return f"| {r['model']} | {r['title']} | {r['micro_batch']} | OOM | OOM | OOM | OOM | OOM | OOM |"
    return (f"| {r['model']} | {r['title']} | {r['micro_batch']} | {r['ms_per_step']:.1f} | {r['seq_per_s']:,.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.3f} | {100 * r['mfu']:.2f}% | {r['peak_mem_gib']:.2f} |")


def markdown_table(rows: list[dict], peak_tflops: float) -> str:
    lines = [_HEADER, *(_table_line(r) for r in rows), "",
             f"MFU = seq/s x FLOPs/sequence / ({peak_tflops:g} TFLOP/s peak); {FLOP_FORMULA} "
             "(s: sequence length, d: hidden size, L: layers; embeddings and PKM value tables excluded)."]
    for model in dict.fromkeys(r["model"] for r in rows):
        for micro in dict.fromkeys(r["micro_batch"] for r in rows if r["model"] == model):
            by = {r["row"]: r for r in rows if r["model"] == model and r["micro_batch"] == micro and r.get("status") == "ok"}
            parts = []
            if "ours" in by and "ours_pkm" in by:
                parts.append(f"PKM / memory-less step time {by['ours_pkm']['ms_per_step'] / by['ours']['ms_per_step']:.3f}")
            if "ours" in by and "hf" in by:
                parts.append(f"ours memory-less / plain HF step time {by['ours']['ms_per_step'] / by['hf']['ms_per_step']:.3f}")
            if parts:
                lines.append(f"- {model}, micro {micro}: " + "; ".join(parts))
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    import platform

    import deepspeed
    import transformers

    env = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "device": str(device), "cpu_model": _cpu_model()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a list of integers like 64,256, got {text!r}") from e
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"micro-batch sizes must be positive integers, got {text!r}")
    return sorted(set(values))


def _name_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x for x in text.replace(",", " ").split() if x]
        bad = [x for x in names if x not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return names
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cpu (cuda with --gpu)")
    p.add_argument("--gpu", action="store_true",
                   help="shorthand for --device cuda --precision bf16 --models base,large and --gpu-micro as micro-batches")
    p.add_argument("--models", type=_name_list(("small", "tiny", "base", "large")),
                   help="comma list of small (--hidden/--layers), tiny, base, large; default small (CPU), base,large (--gpu)")
    p.add_argument("--rows", type=_name_list(ROWS), default=list(ROWS), help="comma list of hf, ours, ours_pkm")
    p.add_argument("--micro", type=_int_list, default=[8], help="micro-batch sizes (sequences), e.g. 8 or 64,256")
    p.add_argument("--gpu-micro", type=_int_list, default=[64, 256], help="micro-batch sizes with --gpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row and micro-batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="hidden size of --models small")
    p.add_argument("--layers", type=int, default=4, help="layers of --models small")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--n-keys", type=int, default=512, help="PKM sub-keys per half: n^2 slots")
    p.add_argument("--mem-heads", type=int, default=4)
    p.add_argument("--mem-knn", type=int, default=32)
    p.add_argument("--ds-config", help="DeepSpeed config of the 'ours' rows (its micro-batch and accumulation are "
                                       "replaced); default: ZeRO-2 as in the original measurement")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder layers (memory layers stay eager)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="device peak TFLOP/s for MFU (790: H200 bf16)")
    p.add_argument("--interleave", action="store_true",
                   help="CPU only: build every row first and step them in turn (median step), so load from other "
                        "jobs on a shared machine hits all rows alike; peak memory is then the whole process's")
    p.add_argument("--check-syncs", action="store_true", help="report host-device syncs of one step per row")
    p.add_argument("--profile", metavar="DIR", help="also profile 3 steps per row and micro-batch (torch.profiler); "
                                                   "key_averages tables go to DIR/<model>_<row>_micro<m>.txt")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.gpu:
        args.device = args.device or "cuda"
        args.models = args.models or ["base", "large"]
        args.micro = args.gpu_micro
    args.device = args.device or "cpu"
    args.models = args.models or ["small"]
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.steps <= 0 or args.warmup < 0 or args.seq < 8 or args.peak_tflops <= 0 or args.vocab < 256:
        p.error("--steps must be positive, --warmup >= 0, --seq >= 8, --vocab >= 256 and --peak-tflops positive")
    if args.interleave and (args.device != "cpu" or args.check_syncs or args.profile):
        p.error("--interleave is for CPU timing only (without --check-syncs and --profile)")
    if args.ds_config and not os.path.isfile(args.ds_config):
        p.error(f"--ds-config {args.ds_config} does not exist")
    return args


def model_shape(name: str, args) -> Shape:
    if name == "small":
        hidden, layers, heads, inter = args.hidden, args.layers, max(1, args.hidden // 64), 4 * args.hidden
    else:
        hidden, layers, heads, inter = MODEL_SIZES[name]
    return Shape(hidden, layers, heads, inter, args.vocab, args.seq)


def _init_process_group(device: torch.device) -> None:
    """A world of one for DeepSpeed, on the device asked for: DS_ACCELERATOR decides where DeepSpeed
    puts the engine, so it must be set before deepspeed is first imported."""
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    if os.environ["DS_ACCELERATOR"] != device.type:
        raise SystemExit(f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} but --device {device.type}: DeepSpeed "
                         "would put the engine on another device than the data; unset DS_ACCELERATOR.")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(key, value)
    import logging

    from pretrain.distributed import init_distributed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed("nccl" if device.type == "cuda" else "gloo")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda (or --gpu) but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    _init_process_group(device)
    env = environment(device)
    print(json.dumps(env), flush=True)
    rows: list[dict] = []
    for model in args.models:
        args.current_model = model
        shape = model_shape(model, args)
        if args.interleave:
            rows.extend(run_interleaved(shape, args, device, args.precision, args.micro))
            continue
        for row in args.rows:
            rows.extend(run_row(row, shape, args, device, args.precision, args.micro))
    print("\n" + markdown_table(rows, args.peak_tflops), flush=True)
    for r in rows:
        events = r.get("host_syncs", [])
        for event in events if isinstance(events, list) else []:
            print(f"host sync in {r['title']} ({r['model']}): {event['op']} at {event['where']}")
    if args.json:
        from atomic_files import write_json_atomic

        write_json_atomic(args.json, {"env": env, "formula": FLOP_FORMULA, "peak_tflops": args.peak_tflops,
                                      "steps": args.steps, "warmup": args.warmup, "rows": rows})
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
