"""benchmarks/train_step.py on CPU with a tiny model (seconds): the three rows, MFU by the stated
formula (recomputed here from an independent parameter count), and no host sync from our code in
the real ``Trainer.train_step``. Also the FLOP helper against the issue's BERT-large figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pretrain.throughput import FLOP_FORMULA, flops_per_sequence, mfu, non_embedding_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden=64, layers=2, heads=2, intermediate=256, seq=32, vocab=1000, n_keys=16, mem_heads=2, mem_knn=4)
MEM_K_DIM = 256  # the presets' default key dimension (benchmarks/train_step.py keeps it)
MICROS = (2, 4)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("bench") / "train_step.json")
    cmd = [sys.executable, "benchmarks/train_step.py", "--models", "tiny", "--micro", ",".join(map(str, MICROS)),
           "--seq", str(TINY["seq"]), "--vocab", str(TINY["vocab"]), "--n-keys", str(TINY["n_keys"]),
           "--mem-heads", str(TINY["mem_heads"]), "--mem-knn", str(TINY["mem_knn"]), "--steps", "2",
           "--warmup", "1", "--check-syncs", "--json", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    with open(out) as f:
        return p.stdout, json.load(f)


def _independent_hf_count() -> int:
    """Non-embedding parameters of the tiny HF BertForMaskedLM, by parameter name."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
                     num_attention_heads=TINY["heads"], intermediate_size=TINY["intermediate"],
                     max_position_embeddings=512)
    with torch.device("meta"):
        model = BertForMaskedLM(cfg)
    tables = ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
              "cls.predictions.decoder.weight")  # (the decoder is tied to the word embeddings)
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith(tables))


def test_table_has_three_rows_with_positive_numbers(bench):
    stdout, data = bench
    rows = data["rows"]
    assert [(r["row"], r["micro_batch"]) for r in rows] == [(row, m) for row in ("hf", "ours", "ours_pkm") for m in MICROS]
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("ms_per_step", "seq_per_s", "tokens_per_s", "model_tflops", "mfu", "peak_mem_gib"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["tokens_per_s"] == pytest.approx(r["seq_per_s"] * TINY["seq"])
        assert r["seq_per_s"] == pytest.approx(r["micro_batch"] / (r["ms_per_step"] / 1e3))
    table = stdout[stdout.index("| model | row |"):]
    for title in ("plain HF BertForMaskedLM", "ours, memory-less", "ours + PKM"):
        assert sum(line.startswith(f"| tiny | {title} |") for line in table.splitlines()) == len(MICROS)
    assert FLOP_FORMULA in stdout and "PKM / memory-less step time" in stdout and "/ plain HF step time" in stdout
    assert data["formula"] == FLOP_FORMULA and data["env"]["device"] == "cpu"


def test_mfu_follows_the_stated_formula(bench):
    _, data = bench
    s, d, L = TINY["seq"], TINY["hidden"], TINY["layers"]
    n_hf = _independent_hf_count()
    h, kd, n = TINY["mem_heads"], MEM_K_DIM, TINY["n_keys"]
    memory = (d * h * kd + h * kd) + 2 * h * kd + h * 2 * n * (kd // 2)  # query Linear, BatchNorm, sub-keys
    expected_params = {"hf": n_hf, "ours": n_hf, "ours_pkm": n_hf + memory}
    for r in data["rows"]:
        assert r["non_embedding_params"] == expected_params[r["row"]], r["row"]
        flops = (6 * expected_params[r["row"]] + 12 * s * d * L) * s
        assert r["mfu"] == pytest.approx(r["seq_per_s"] * flops / (data["peak_tflops"] * 1e12), rel=1e-12)
        assert r["model_tflops"] == pytest.approx(r["seq_per_s"] * flops / 1e12, rel=1e-12)


def test_our_train_step_has_no_host_sync(bench):
    """One non-log step of the real Trainer: no sync from pretrain/ or the model; the ones left
    are reported (DeepSpeed's clipping check, the value tables' kernels of pkm/sparse_adam.py)."""
    _, data = bench
    checked = [r for r in data["rows"] if r["row"] != "hf" and "host_syncs" in r]  # first micro-batch of each
    assert [r["row"] for r in checked] == ["ours", "ours_pkm"]
    for r in checked:
        ours = [e for e in r["host_syncs"]
                if e["where"].startswith(("pretrain/", "pkm/modeling.py", "pkm/memory.py", "pkm/usage.py"))]
        assert not ours, ours


def test_flops_formula_matches_the_issue_for_bert_large():
    """(6 x non-embedding params + 12 s d L) x s = about 2.37e11 for BERT-large at s = 128."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    with torch.device("meta"):
        model = BertForMaskedLM(cfg)
    n = non_embedding_params(model)
    # 24 layers + embedding LayerNorm + MLM head transform (Linear + LayerNorm) + decoder bias
    assert n == 24 * 12_596_224 + 2 * 1024 + (1024 * 1024 + 1024 + 2 * 1024) + 30522
    flops = flops_per_sequence(n, 128, 1024, 24)
    assert flops == pytest.approx(2.37e11, rel=0.01)
    assert mfu(339.0, flops, 790.0) == pytest.approx(0.102, abs=0.001)  # the issue's "roughly 10%"
    with pytest.raises(ValueError, match="positive"):
        flops_per_sequence(0, 128, 1024, 24)
    with pytest.raises(ValueError, match="peak_tflops"):
        mfu(1.0, flops, 0.0)


def test_bad_micro_batch_list_is_rejected_before_work():
    p = subprocess.run([sys.executable, "benchmarks/train_step.py", "--micro", "64,x"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "expected a list of integers like 64,256" in p.stderr


def test_gpu_script_command_lines_parse(tmp_path):
    """benchmarks/gpu_train_step.sh with a stand-in python that only parses each benchmark command
    line: every flag is valid and every step writes its log (the real run needs a GPU)."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "benchmarks/train_step.py" ]; then shift; exec ' + sys.executable + ' -c "import sys; '
        "from benchmarks.train_step import parse_args; a = parse_args(sys.argv[1:]); "
        "print('PARSED', a.device, a.precision, a.models, a.micro, a.rows, a.compile)\" \"$@\"; fi\n"
        "exit 0\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "EXTRA": "1", "PYTHONPATH": REPO}
    p = subprocess.run(["bash", "benchmarks/gpu_train_step.sh"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    logs = {name: (out / f"{name}.log").read_text() for name in
            ("base", "large", "profile", "large_zero2_default", "large_compile")}
    assert "PARSED cuda bf16 ['base'] [64, 256] ['hf', 'ours', 'ours_pkm'] False" in logs["base"]
    assert "PARSED cuda bf16 ['large'] [64, 256] ['hf', 'ours', 'ours_pkm'] False" in logs["large"]
    assert "PARSED cuda bf16 ['large'] [256] ['ours_pkm'] False" in logs["profile"]
    assert "['ours', 'ours_pkm']" in logs["large_zero2_default"] and "True" in logs["large_compile"]


def test_gpu_session_script_command_lines_parse(tmp_path):
    """benchmarks/gpu_session.sh, the one script a lent GPU runs, with a stand-in python3 on PATH that
    parses each training-step command line (and runs the inline helpers): every stage's flags are
    valid, the A/B config is written as the ZeRO-2 form of the one-GPU config, and results are packed."""
    import tarfile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "benchmarks/train_step.py" ]; then shift; exec ' + sys.executable + ' -c "import sys; '
        "from benchmarks.train_step import parse_args; a = parse_args(sys.argv[1:]); "
        "print('PARSED', a.models, a.micro, a.rows, a.compile, a.ds_config, a.warmup)\" \"$@\"; fi\n"
        'if [ "$1" = "-c" ]; then exec ' + sys.executable + ' "$@"; fi\n'
        "exit 0\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": REPO}
    p = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    with tarfile.open(out / "gpu_results.tgz") as tar:
        tar.extractall(tmp_path / "results", filter="data")
    train = tmp_path / "results" / "train"
    logs = {name: (train / f"{name}.log").read_text()
            for name in ("large", "large_zero2_form", "large_compiled", "base", "profile")}
    one_gpu = "ds_configs/h200_bert_large_bf16.json"
    assert f"PARSED ['large'] [64, 256] ['hf', 'ours', 'ours_pkm'] False {one_gpu} 3" in logs["large"]
    assert "['ours', 'ours_pkm'] False" in logs["large_zero2_form"] and "zero2_form.json" in logs["large_zero2_form"]
    assert f"PARSED ['large'] [256] ['hf', 'ours', 'ours_pkm'] True {one_gpu} 5" in logs["large_compiled"]
    assert f"PARSED ['base'] [64, 256] ['hf', 'ours', 'ours_pkm'] False {one_gpu} 3" in logs["base"]
    assert f"PARSED ['large'] [256] ['ours_pkm'] False {one_gpu} 2" in logs["profile"]
    with open(train / "zero2_form.json") as f:
        zero2 = json.load(f)
    with open(os.path.join(REPO, one_gpu)) as f:
        expected = json.load(f)
    expected["zero_optimization"].update(stage=2, contiguous_gradients=True)
    assert zero2 == expected
