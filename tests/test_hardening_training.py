"""Hardening of the training loop: a diverged run is reported as such and never saved."""

from __future__ import annotations

import math
import os

import pytest
import torch

from pretrain.config import load_config
from tests.test_hardening_checkpoints import run_main, shard_dir, write_cfg  # noqa: F401  (session fixture)
from tests.test_pretrain import run_config


class _OneBatch:
    """A stand-in for ValidationData: one fixed batch with some masked positions."""

    def __init__(self, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, vocab, (2, 12), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, 3] = ids[:, 3]
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def num_batches(self, cap: int = 0) -> int:
        return 1

    def batches(self, n: int):
        yield dict(self.batch)


def _tiny_model():
    from pkm.modeling import BertPkmForMaskedLM
    from pkm.presets import preset_config

    torch.manual_seed(0)
    return BertPkmForMaskedLM(preset_config("tiny", vocab_size=50)).eval()


def test_evaluation_of_a_diverged_model_shows_nan_not_zero():
    from pretrain.evaluate import evaluate_mlm

    model = _tiny_model()
    data = _OneBatch(50)
    good, _ = evaluate_mlm(model, data, 1, torch.device("cpu"), [256])
    assert math.isfinite(good["loss"]) and good["loss"] > 0 and good["perplexity"] > 1
    with torch.no_grad():
        model.cls.predictions.decoder.bias.fill_(float("nan"))
    bad, _ = evaluate_mlm(model, data, 1, torch.device("cpu"), [256])
    assert math.isnan(bad["loss"]) and math.isnan(bad["perplexity"])


def test_max_skipped_steps_is_validated():
    assert load_config(None, []).train.max_skipped_steps == 20
    with pytest.raises(ValueError, match="train.max_skipped_steps must be >= 0"):
        load_config(None, [("train.max_skipped_steps", -1)])


def test_diverged_run_stops_with_an_error_and_keeps_the_last_good_checkpoint(shard_dir, tmp_path):  # noqa: F811
    out = str(tmp_path / "run")
    data = run_config(shard_dir, out, max_steps=40, ckpt_every=1, max_skipped_steps=4)
    data["optim"].update(lr=1e6, warmup_steps=0)  # the first update blows the weights up
    cfg = write_cfg(str(tmp_path / "cfg.json"), data)
    p = run_main(["--deepspeed_config", "ds_configs/tiny_zero2_fp32.json", "--config", cfg])
    assert p.returncode == 3, p.stderr[-3000:]
    assert "training diverged: the last 4 steps" in p.stderr and "max_skipped_steps=4" in p.stderr
    root = os.path.join(out, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        latest = f.read().strip()
    assert latest == "step_00000001"  # written before the loss went NaN; nothing after it
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_00000001"]
    assert f"The last good checkpoint is {os.path.join(root, latest)}" in p.stderr
    module = torch.load(os.path.join(root, latest, "ds", "state", "mp_rank_00_model_states.pt"),
                        weights_only=True)["module"]
    running = {k: v for k, v in module.items() if "running_" in k}
    assert running and all(torch.isfinite(v).all() for v in running.values())
