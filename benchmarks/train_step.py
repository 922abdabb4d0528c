"""Training-step time and tokens/s with and without the memory layer (otherwise the same model).

    python benchmarks/train_step.py                     # CPU: small BERT (hidden 256, 4 layers), seq 128
    python benchmarks/train_step.py --steps 20 --micro 16 --n-keys 512
    python benchmarks/train_step.py --gpu               # + BERT-base / BERT-large, seq 128, bf16 (needs CUDA)

Each variant runs the real training step of pretrain/ (``Trainer.train_step``: DeepSpeed ZeRO-2
engine for the dense part, column-sharded value table + SparseAdam + clipping + staleness marks for
the memory) on synthetic MLM batches (15% of positions predicted), in one process (world size 1).
The memory variant adds a residual PKM (ResM) in the middle layer; the baseline is the same
config with ``memory_layers=[]``. Printed: median step time, tokens/s, and the PKM/baseline ratio
(goal: <= 1.15). Numbers from a shared or loaded machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


class SyntheticMLM:
    """Endless random MLM micro-batches (fixed seed), the TrainStream interface the Trainer reads."""

    def __init__(self, vocab_size: int, micro: int, seq: int, device: str, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.vocab, self.micro, self.seq = vocab_size, micro, seq
        self.epoch = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, self.vocab, (self.micro, self.seq), generator=self.g)
        select = torch.rand(self.micro, self.seq, generator=self.g) < 0.15
        labels = torch.where(select, ids, torch.full_like(ids, -100))
        inputs = torch.where(select, torch.full_like(ids, 103), ids)
        return {"input_ids": inputs, "attention_mask": torch.ones_like(ids),
                "token_type_ids": torch.zeros_like(ids), "labels": labels}

    def state_dict(self) -> dict:
        return {}


def _ds_config(cfg, micro: int, precision: str, on_gpu: bool) -> dict:
    from pretrain.main import resolve_ds_config

    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 2, "overlap_comm": on_gpu, "contiguous_gradients": True}}
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return resolve_ds_config(cfg, ds, world_size=1, on_gpu=on_gpu)


def build_variant(model_kwargs: dict, with_memory: bool, micro: int, seq: int, steps: int, precision: str,
                  device: torch.device):
    """(trainer, info) for one variant: the same model config with or without the memory layer."""
    from pkm.modeling import BertPkmForMaskedLM
    from pkm.presets import preset_config
    from pretrain.config import load_config
    from pretrain.trainer import Trainer, build_engine, seed_everything

    out_dir = tempfile.mkdtemp(prefix="bench_train_step_")
    cfg = load_config(None, [("train.out_dir", out_dir), ("train.tensorboard", False),
                             ("train.max_steps", 10 * steps + 100), ("optim.value_grad_clip", 1.0)])
    kwargs = dict(model_kwargs)
    preset = kwargs.pop("preset")
    if not with_memory:
        kwargs["memory_layers"] = []
    seed_everything(0)
    model = BertPkmForMaskedLM(preset_config(preset, **kwargs), external_values=True)  # build_engine attaches
    model.train()
    n_all = sum(p.numel() for p in model.parameters())
    ds = _ds_config(cfg, micro, precision, device.type == "cuda")
    engine, tables, vopt, vsched = build_engine(model, cfg, ds, device)
    data = SyntheticMLM(model.config.vocab_size, micro, seq, device.type)
    trainer = Trainer(cfg, engine, tables, vopt, vsched, data, None, ds, rank=0, world_size=1)
    trainer.logger.setLevel("WARNING")
    value_params = sum(t.weight.numel() for t in tables.values())
    return trainer, {"dense_params": n_all - value_params, "value_params": value_params}


def _timed_step(trainer, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_pair(name: str, model_kwargs: dict, micro: int, seq: int, steps: int, warmup: int, precision: str,
             device: torch.device) -> dict:
    """Both variants built side by side and stepped alternately (base, PKM, base, PKM, ...), so load
    from other processes on a shared machine hits both alike."""
    variants = {v: build_variant(model_kwargs, v == "pkm", micro, seq, steps, precision, device)
                for v in ("baseline", "pkm")}
    times: dict[str, list[float]] = {"baseline": [], "pkm": []}
    for i in range(warmup + steps):
        for v, (trainer, _) in variants.items():
            t = _timed_step(trainer, device)
            if i >= warmup:
                times[v].append(t)
    res = {}
    for v, (trainer, info) in variants.items():
        trainer.metrics.close()
        step_s = statistics.median(times[v])
        res[v] = {"step_s": step_s, "step_s_min": min(times[v]), "tokens_per_s": micro * seq / step_s, **info}
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base, pkm = res["baseline"], res["pkm"]
    ratio = pkm["step_s"] / base["step_s"]
    row = {"setting": name, "device": str(device), "precision": precision, "micro_batch": micro, "seq": seq,
           "steps": steps, "baseline": base, "pkm": pkm, "ratio": ratio}
    print(f"{name:<34} {precision:>5}  baseline {base['step_s'] * 1e3:8.1f} ms/step {base['tokens_per_s']:9.0f} tok/s | "
          f"PKM {pkm['step_s'] * 1e3:8.1f} ms/step {pkm['tokens_per_s']:9.0f} tok/s | ratio {ratio:.3f} "
          f"({'<=' if ratio <= 1.15 else '>'} 1.15); min-step ratio {pkm['step_s_min'] / base['step_s_min']:.3f}",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=8, help="CPU micro-batch (sequences)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--n-keys", type=int, default=512, help="sub-keys per half: n^2 slots")
    p.add_argument("--gpu", action="store_true", help="also BERT-base/large bf16 on CUDA (skipped without one)")
    p.add_argument("--gpu-micro", type=int, default=32)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    import logging

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, cuda {torch.cuda.is_available()}", flush=True)
    rows = []
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    small = {"preset": "bert-base", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
             "num_attention_heads": max(1, args.hidden // 64), "intermediate_size": 4 * args.hidden,
             "memory_layers": [args.layers // 2], "mem_n_keys": args.n_keys}
    rows.append(run_pair(f"small BERT h{args.hidden} L{args.layers} (CPU)", small, args.micro, args.seq,
                         args.steps, args.warmup, "fp32", torch.device("cpu")))
    if args.gpu:
        if not torch.cuda.is_available():
            print("no CUDA device: BERT-base/large GPU benchmark skipped")
        else:
            for preset in ("bert-base", "bert-large"):
                rows.append(run_pair(f"{preset} (GPU)", {"preset": preset}, args.gpu_micro, args.seq,
                                     args.steps, args.warmup, "bf16", torch.device("cuda", 0)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
