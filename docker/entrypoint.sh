#!/usr/bin/env bash
# Container entrypoint. The project's subcommands go to run.sh (`docker run IMAGE pretrain ...`);
# anything else that is a command in the image runs as is, so the same image also serves
# `docker run IMAGE deepspeed --hostfile ...` (multi-node), `bash`, `python`, `ds_report`.
set -euo pipefail

# run.sh of the project this script belongs to (/workspace/pkm/run.sh in the image).
RUN_SH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/run.sh"

# NGC images set up the container in their own entrypoint (CUDA forward compatibility for older
# drivers, InfiniBand/MOFED checks, the banner); go through it once, then come back here.
NV_ENTRYPOINT=/opt/nvidia/nvidia_entrypoint.sh
if [[ -x "$NV_ENTRYPOINT" && -z "${PKM_NV_ENTRYPOINT_DONE:-}" ]]; then
  export PKM_NV_ENTRYPOINT_DONE=1
  exec "$NV_ENTRYPOINT" "${BASH_SOURCE[0]}" "$@"
fi

# Keep in step with the subcommands of run.sh (tests/test_docker.py checks it). Listed first because
# some are also names of system programs (`test`).
case "${1:-}" in
  setup|demo|ablation|test|prep|pretrain|selftest|convert|finetune|sweep|bench|help|-h|--help|"")
    exec "$RUN_SH" "$@" ;;
esac

# The deepspeed launcher runs under the project's signal forwarding (pretrain/launch_signals.py):
# as PID 1 it would ignore `docker stop`'s SIGTERM (a PID 1 without a handler does), and its own
# handling leaves the ranks running or kills them within 30 s. The forwarder passes SIGTERM/SIGINT
# on to the ranks, which checkpoint and exit 0; it also reaps the orphans a PID 1 inherits.
if [[ "$1" == "deepspeed" ]]; then
  exec python3 -m pretrain.launch_signals run -- "$@"
fi

if command -v -- "$1" >/dev/null 2>&1; then
  exec "$@"
fi
# Neither: run.sh says it does not know the command and prints its usage.
exec "$RUN_SH" "$@"
