"""Hardening of pretraining checkpoints: untrusted files, damaged checkpoints, resume checks.

One tiny single-process run (ZeRO-2, fp32, 2 steps) is made per session; each test works on a copy.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess

import pytest
import torch

from tests.test_pretrain import PY, REPO, RANK_ENV, make_shards, run_config

_RUN: dict[str, str] = {}


def run_main(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pretrain.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **RANK_ENV})


def write_cfg(path: str, cfg: dict) -> str:
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> str:
    return make_shards(str(tmp_path_factory.mktemp("harden_data")))


@pytest.fixture(scope="session")
def tiny_run(shard_dir, tmp_path_factory) -> dict[str, str]:
    """A finished 2-step run with checkpoints at steps 1 and 2 (ZeRO-2, fp32, one process)."""
    if not _RUN:
        root = str(tmp_path_factory.mktemp("harden_run"))
        out = os.path.join(root, "run")
        data = run_config(shard_dir, out, max_steps=2, ckpt_every=1)
        data["optim"]["warmup_steps"] = 0
        cfg = write_cfg(os.path.join(root, "cfg.json"), data)
        p = run_main(["--deepspeed_config", "ds_configs/tiny_zero2_fp32.json", "--config", cfg])
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        _RUN.update(out=out, cfg=cfg)
    return _RUN


def copy_run(run: dict[str, str], dst: str) -> str:
    shutil.copytree(run["out"], dst)
    return dst


def resume(out: str, cfg: str, *extra: str) -> subprocess.CompletedProcess:
    return run_main(["--deepspeed_config", "ds_configs/tiny_zero2_fp32.json", "--config", cfg,
                     f"--train.out_dir={out}", "--train.max_steps=3", "--resume", *extra])


# --------------------------------------------------------------------------------------------------
# 1. a pickle payload inside a checkpoint never runs
# --------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls exec, which writes the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def plant_payload(ckpt: str, rel: str, marker: str) -> None:
    """Rewrite a real checkpoint file with the payload inside its (otherwise intact) content, and
    its size in meta.json, as an attacker would (the size check is no defence)."""
    path = os.path.join(ckpt, rel)
    obj = torch.load(path, map_location="cpu", weights_only=False)
    obj["zz_payload"] = _Payload(marker)
    torch.save(obj, path)
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    meta["files"][rel] = os.path.getsize(path)
    with open(os.path.join(ckpt, "meta.json"), "w") as f:
        json.dump(meta, f)


_PAYLOAD_FILES = [
    "ds/state/mp_rank_00_model_states.pt",
    "ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "train_state/rank_00000.pt",
    "values/values_shard_00000-of-00001.pt",
]


@pytest.mark.parametrize("rel", _PAYLOAD_FILES)
def test_payload_does_not_run_on_resume(tiny_run, tmp_path, rel):
    out = copy_run(tiny_run, str(tmp_path / "run"))
    marker = str(tmp_path / "pwned")
    plant_payload(os.path.join(out, "checkpoints", "step_00000002"), rel, marker)
    p = resume(out, tiny_run["cfg"])
    assert not os.path.exists(marker), "the pickle payload ran"
    assert p.returncode != 0
    assert "refused" in p.stdout + p.stderr


@pytest.mark.parametrize("rel", ["ds/state/mp_rank_00_model_states.pt",
                                 "ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_payload_does_not_run_on_convert(tiny_run, tmp_path, rel):
    out = copy_run(tiny_run, str(tmp_path / "run"))
    marker = str(tmp_path / "pwned")
    plant_payload(os.path.join(out, "checkpoints", "step_00000002"), rel, marker)
    p = subprocess.run([PY, "-m", "pretrain.convert", out, str(tmp_path / "hf")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert not os.path.exists(marker), "the pickle payload ran"
    assert p.returncode == 2, p.stderr[-3000:]
    assert "refused because unpickling it could run code" in p.stderr


def test_clean_checkpoint_converts_and_train_state_is_plain_data(tiny_run, tmp_path):
    from pretrain.convert import convert_checkpoint

    ckpt = os.path.join(tiny_run["out"], "checkpoints", "step_00000002")
    state = torch.load(os.path.join(ckpt, "train_state", "rank_00000.pt"), weights_only=True)  # no numpy inside
    assert state["step"] == 2 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    torch.load(os.path.join(ckpt, "values", "value_scheduler.pt"), weights_only=True)
    assert os.path.isfile(os.path.join(convert_checkpoint(tiny_run["out"], str(tmp_path / "hf")), "model.safetensors"))


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from pretrain.checkpoint import capture_rng_state, load_train_state_file, restore_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # a cached gaussian in the numpy state
    path = str(tmp_path / "rng.pt")
    torch.save({"rng": capture_rng_state()}, path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng_state(load_train_state_file(path)["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


# --------------------------------------------------------------------------------------------------
# 8. a damaged latest checkpoint: detected from the meta's file list, skipped, or chosen by hand
# --------------------------------------------------------------------------------------------------


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_meta_records_a_format_version_and_every_file_size(tiny_run):
    from pretrain.checkpoint import CKPT_FORMAT_VERSION, checkpoint_problems, read_meta

    ckpt = os.path.join(tiny_run["out"], "checkpoints", "step_00000002")
    meta = read_meta(ckpt)
    assert meta["format_version"] == CKPT_FORMAT_VERSION == 2
    assert meta["files"]["train_state/rank_00000.pt"] == os.path.getsize(os.path.join(ckpt, "train_state", "rank_00000.pt"))
    assert "ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt" in meta["files"] and "meta.json" not in meta["files"]
    assert checkpoint_problems(ckpt) == []


def test_damaged_checkpoints_are_skipped_with_a_warning(tiny_run, tmp_path):
    from pretrain.checkpoint import checkpoint_problems, latest_checkpoint

    out = copy_run(tiny_run, str(tmp_path / "run"))
    step1, step2 = (os.path.join(out, "checkpoints", f"step_0000000{i}") for i in (1, 2))
    _truncate(os.path.join(step2, "values", "values_shard_00000-of-00001.pt"))
    warnings: list[str] = []
    assert latest_checkpoint(out, warn=warnings.append) == step1
    assert "step_00000002' is damaged (values/values_shard_00000-of-00001.pt has" in warnings[0]
    os.remove(os.path.join(step1, "train_state", "rank_00000.pt"))
    assert checkpoint_problems(step1) == ["train_state/rank_00000.pt is missing"]
    assert latest_checkpoint(out) is None
    with open(os.path.join(step2, "meta.json"), "w") as f:
        f.write('{"step": 2, "wor')  # cut short
    assert "cannot be read" in checkpoint_problems(step2)[0]


def test_resume_falls_back_to_the_newest_intact_checkpoint(tiny_run, tmp_path):
    from pretrain.checkpoint import checkpoint_problems

    out = copy_run(tiny_run, str(tmp_path / "run"))
    _truncate(os.path.join(out, "checkpoints", "step_00000002", "ds", "state",
                           "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    p = resume(out, tiny_run["cfg"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step_00000002' is damaged (ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt has" in p.stderr
    assert "resumed from" in p.stdout + p.stderr and "step_00000001 at step 1" in p.stdout + p.stderr
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_00000003"
    assert checkpoint_problems(os.path.join(out, "checkpoints", "step_00000002")) == []  # written again


def _prep(shard_dir: str, out: str, *extra: str):
    """prepare_run with the settings of tiny_run (seed 11)."""
    from tests.test_pretrain import _prep as prep

    return prep(shard_dir, out, "--train.seed=11", *extra)


def test_resume_from_a_chosen_checkpoint_is_checked_before_the_run(tiny_run, shard_dir, tmp_path):
    out = copy_run(tiny_run, str(tmp_path / "run"))
    step1, step2 = (os.path.join(out, "checkpoints", f"step_0000000{i}") for i in (1, 2))
    with pytest.raises(ValueError, match="holds the newer checkpoint\\(s\\) step_00000002"):
        _prep(shard_dir, out, f"--train.resume_from={step1}")
    assert _prep(shard_dir, out, f"--train.resume_from={step2}").resume_from == step2
    assert _prep(shard_dir, str(tmp_path / "fresh"), f"--train.resume_from={step1}").resume_from == step1
    _truncate(os.path.join(step2, "train_state", "rank_00000.pt"))
    assert _prep(shard_dir, out, f"--train.resume_from={step1}").resume_from == step1  # the newer one is damaged
    with pytest.raises(ValueError, match="resume_from '.*step_00000002' is damaged"):
        _prep(shard_dir, out, f"--train.resume_from={step2}")
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        _prep(shard_dir, out, f"--train.resume_from={tmp_path}")


def test_rotation_never_removes_the_checkpoint_just_written(tmp_path):
    from pretrain.checkpoint import _rotated_out

    root = str(tmp_path)
    for step in (4, 5, 9):
        os.makedirs(os.path.join(root, f"step_{step:08d}"))
        open(os.path.join(root, f"step_{step:08d}", "meta.json"), "w").close()
    # a run resumed from step 4 (9 was damaged) just wrote step 5
    assert _rotated_out(root, 5, 1) == [os.path.join(root, "step_00000004")]
    assert _rotated_out(root, 9, 2) == [os.path.join(root, "step_00000004")]


# --------------------------------------------------------------------------------------------------
# 3. damaged shards are reported before any model is built
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def shard_copy(shard_dir, tmp_path) -> str:
    return shutil.copytree(shard_dir, str(tmp_path / "shards"))


def _prep_shards(shards: str, tmp_path, *extra: str):
    return _prep(shards, str(tmp_path / "run"), *extra)


def _first_shard(shards: str, split: str = "train") -> str:
    with open(os.path.join(shards, "manifest.json")) as f:
        return os.path.join(shards, json.load(f)["splits"][split]["shards"][0]["bin"])


def test_truncated_bin_is_reported_before_the_run(shard_copy, tmp_path):
    _truncate(_first_shard(shard_copy))
    with pytest.raises(ValueError, match="train_00000.bin is truncated"):
        _prep_shards(shard_copy, tmp_path)


def test_flipped_idx_header_is_reported_before_the_run(shard_copy, tmp_path):
    idx = _first_shard(shard_copy, "validation")[:-4] + ".idx"
    with open(idx, "r+b") as f:
        f.write(b"X")  # first byte of the magic number
    with pytest.raises(ValueError, match="validation_00000.idx is not a PKM shard index"):
        _prep_shards(shard_copy, tmp_path)


def test_out_of_vocabulary_tokens_are_reported_before_the_run(shard_copy, tmp_path):
    _prep_shards(shard_copy, tmp_path)  # a first check fills the cache ...
    assert os.path.isfile(os.path.join(shard_copy, "shards_verified.json"))
    path = _first_shard(shard_copy)
    with open(path, "r+b") as f:  # ... which a changed file does not fool
        f.seek(32 + 2 * 10)
        f.write(b"\xff\xff")
    with pytest.raises(ValueError, match="train_00000.bin holds token id 65535, but the vocabulary has 30522 ids"):
        _prep_shards(shard_copy, tmp_path)


def test_edited_checksum_is_reported_with_verify_checksums(shard_copy, tmp_path):
    path = os.path.join(shard_copy, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["splits"]["train"]["shards"][0]["sha256_bin"] = "0" * 64
    with open(path, "w") as f:
        json.dump(manifest, f)
    _prep_shards(shard_copy, tmp_path)  # not asked for: sizes and ids are fine
    with pytest.raises(ValueError, match="train_00000.bin fails its manifest.json checksum"):
        _prep_shards(shard_copy, tmp_path, "--data.verify_checksums=true")


def test_cli_reports_a_bad_shard_before_deepspeed_starts(shard_copy, tmp_path):
    _truncate(_first_shard(shard_copy, "validation"))
    p = run_main(["--deepspeed_config", "ds_configs/tiny_zero2_fp32.json", "--model.preset=tiny",
                  f"--data.shard_dir={shard_copy}", f"--train.out_dir={tmp_path}/r"], timeout=120)
    assert p.returncode == 2 and "validation_00000.bin is truncated" in p.stderr
    assert "DeepSpeed" not in p.stdout and not os.path.exists(tmp_path / "r")


# --------------------------------------------------------------------------------------------------
# 9. mistakes that used to surface only after DeepSpeed started
# --------------------------------------------------------------------------------------------------


def _tiny_memory_with(**changes) -> list[str]:
    """CLI overrides of the tiny memory with some fields changed (fields a model.memory section
    leaves out take MemoryConfig's defaults, not the preset's)."""
    from tests.test_pretrain import TINY_MEMORY

    return [f"--model.memory.{k}={json.dumps(v)}" for k, v in {**TINY_MEMORY, **changes}.items()]


def test_resume_with_another_model_or_data_fails_before_the_run(tiny_run, shard_dir, tmp_path):
    out = copy_run(tiny_run, str(tmp_path / "run"))
    assert _prep(shard_dir, out, "--resume").resume_from.endswith("step_00000002")
    with pytest.raises(ValueError, match=r"holds another model \(mem_n_keys: checkpoint 16, now 8\)"):
        _prep(shard_dir, out, "--resume", *_tiny_memory_with(n_keys=8))
    with pytest.raises(ValueError, match="trained on other data or with another seed"):
        _prep(shard_dir, out, "--resume", "--data.max_seq_len=32")
    with pytest.raises(ValueError, match="seed 11; now .*, 12"):
        _prep(shard_dir, out, "--resume", "--train.seed=12")


def test_rejected_resume_leaves_the_run_config_alone(tiny_run, tmp_path):
    out = copy_run(tiny_run, str(tmp_path / "run"))
    with open(os.path.join(out, "run_config.json"), "rb") as f:
        before = f.read()
    p = resume(out, tiny_run["cfg"], *_tiny_memory_with(n_keys=8))
    assert p.returncode == 2 and "holds another model" in p.stderr
    assert "[pretrain] model:" not in p.stdout + p.stderr  # nothing was built
    with open(os.path.join(out, "run_config.json"), "rb") as f:
        assert f.read() == before


def test_init_from_without_weights_fails_before_the_run(shard_dir, tmp_path):
    from tests.test_pretrain import _minilm_path

    folder = tmp_path / "bert"
    folder.mkdir()
    shutil.copy(os.path.join(_minilm_path(), "config.json"), folder / "config.json")
    with pytest.raises(ValueError, match="has a config.json but no weights"):
        _prep(shard_dir, str(tmp_path / "run"), f"--model.init_from={folder}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    with pytest.raises(ValueError, match="lists weight files that are missing \\(part-1.safetensors\\)"):
        _prep(shard_dir, str(tmp_path / "run"), f"--model.init_from={folder}")


def test_deepspeed_config_typos_are_errors():
    from pretrain.config import load_config
    from pretrain.main import resolve_ds_config

    cfg = load_config(None, [])
    base = {"train_micro_batch_size_per_gpu": 8}
    with pytest.raises(ValueError, match="unknown key 'zero_optimisation' \\(did you mean 'zero_optimization'\\?\\)"):
        resolve_ds_config(cfg, {**base, "zero_optimisation": {"stage": 3}}, 1, False)
    with pytest.raises(ValueError, match="'zero_optimization.overlap_com': Extra inputs are not permitted"):
        resolve_ds_config(cfg, {**base, "zero_optimization": {"stage": 2, "overlap_com": True}}, 1, False)
    with pytest.raises(ValueError, match="'bf16.enabeld'"):
        resolve_ds_config(cfg, {**base, "bf16": {"enabeld": True}}, 1, False)
    ok = resolve_ds_config(cfg, {**base, "zero_optimization": {"stage": 3, "overlap_comm": False},
                                 "bf16": {"enabled": True}, "wall_clock_breakdown": False}, 1, False)
    assert ok["zero_optimization"]["stage"] == 3


def test_cli_reports_a_deepspeed_key_typo_before_starting(shard_dir, tmp_path):
    p = run_main(["--deepspeed_config", "ds_configs/tiny_zero2_fp32.json", "--model.preset=tiny",
                  f"--data.shard_dir={shard_dir}", f"--train.out_dir={tmp_path}/r", "--ds.zero_optimisation.stage=3"],
                 timeout=120)
    assert p.returncode == 2 and "unknown key 'zero_optimisation'" in p.stderr
    assert not os.path.exists(tmp_path / "r")


def test_train_state_with_a_pickled_numpy_rng_still_loads(tmp_path):
    """Train states written before the RNG states became tensors hold a numpy array: the restricted
    loader allows exactly what that array needs, so those checkpoints still resume."""
    import random

    import numpy as np

    from pretrain.checkpoint import load_train_state_file, restore_rng_state

    np.random.seed(3)
    path = str(tmp_path / "rank_00000.pt")
    torch.save({"step": 3, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                   "torch": torch.get_rng_state()}}, path)
    expected = np.random.rand(3).tolist()
    np.random.seed(0)
    restore_rng_state(load_train_state_file(path)["rng"])
    assert np.random.rand(3).tolist() == expected


def test_convert_refuses_a_damaged_checkpoint_and_falls_back_from_a_run_folder(tiny_run, tmp_path, capsys):
    from pretrain.convert import convert_checkpoint, main as convert_main

    out = copy_run(tiny_run, str(tmp_path / "run"))
    step2 = os.path.join(out, "checkpoints", "step_00000002")
    _truncate(os.path.join(step2, "ds", "state", "mp_rank_00_model_states.pt"))
    with pytest.raises(ValueError, match="step_00000002' is damaged: ds/state/mp_rank_00_model_states.pt has"):
        convert_checkpoint(step2, str(tmp_path / "hf2"))
    assert convert_main([out, str(tmp_path / "hf")]) == 0  # the run folder: its newest intact checkpoint
    assert "step_00000002' is damaged" in capsys.readouterr().err
    with open(tmp_path / "hf" / "pretrain_info.json") as f:
        assert json.load(f)["step"] == 1


def test_resume_on_other_data_of_the_same_size_fails_before_the_run(tiny_run, shard_dir, tmp_path):
    out = copy_run(tiny_run, str(tmp_path / "run"))
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_00000002", "data.json"))
    moved = shutil.copytree(shard_dir, str(tmp_path / "moved"))
    assert _prep(moved, out, "--resume").resume_from  # the same data elsewhere is fine
    path = os.path.join(moved, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["splits"]["train"]["shards"][0]["sha256_bin"] = "0" * 64  # other tokens, same counts
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match="was trained on other data: the shards of split 'train'"):
        _prep(moved, out, "--resume")
