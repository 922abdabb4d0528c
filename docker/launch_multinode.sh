#!/usr/bin/env bash
# Example: multi-node pretraining with the pkm-bert image (see docker/README.md, "Multi-node").
#
# Two ways, both with the same DeepSpeed hostfile on every node:
#
#   per-node (no ssh; what schedulers such as Slurm or Kubernetes do): run this on EVERY node,
#     NODE_RANK=<0..N-1> MASTER_ADDR=<node 0's address> docker/launch_multinode.sh per-node [overrides]
#
#   pdsh (DeepSpeed's default launcher, over ssh between the containers):
#     docker/launch_multinode.sh sshd              # on every node: a container running sshd
#     docker/launch_multinode.sh pdsh [overrides]  # on node 0 only: launches all ranks
#
# SIGTERM/SIGINT to this script (a scheduler's stop, Ctrl-C) reach the training ranks, which save a
# checkpoint at their next step and exit: per-node through docker run's signal proxy to the
# container's PID 1, pdsh through a docker exec that signals the launcher inside the container.
#
# Configuration (environment variables; defaults in brackets):
#   IMAGE [pkm-bert:latest-dev]   HOSTFILE [./hostfile]   DATA_DIR [/shared/data]
#   CKPT_DIR [/shared/checkpoints]  DS_CONFIG (ds_configs/<x>.json)  RUN_CONFIG (the run config file)
#   MASTER_ADDR (pdsh: [the hostfile's first host]; set it to node 0's address on the training network)
#   MASTER_PORT [29500]  SSH_PORT [2222]  SSH_DIR [~/.ssh]  NCCL_* and TORCH_NCCL_* are passed on.
#   DRY_RUN=1 prints the docker command instead of running it.
set -euo pipefail

IMAGE="${IMAGE:-pkm-bert:latest-dev}"
HOSTFILE="${HOSTFILE:-$PWD/hostfile}"
DATA_DIR="${DATA_DIR:-/shared/data}"
CKPT_DIR="${CKPT_DIR:-/shared/checkpoints}"
MASTER_PORT="${MASTER_PORT:-29500}"
SSH_PORT="${SSH_PORT:-2222}"
SSH_DIR="${SSH_DIR:-$HOME/.ssh}"
SSHD_NAME="${SSHD_NAME:-pkm-sshd}"

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

# run, as the last command: exec, so this script's pid (the one a scheduler signals) is the command's.
run_exec() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then run "$@"; exit 0; fi
  exec "$@"
}

# The first host of a DeepSpeed hostfile ("node-0 slots=8"; comments and blank lines skipped).
first_host() {
  awk '{sub(/#.*/, "")} NF {print $1; exit}' "$1"
}

# Where the launcher in the sshd container writes its pid, so that a signal can be passed to it.
LAUNCH_PID_FILE=/tmp/pkm-launch.pid

# Run the pdsh launch (a docker exec) and pass SIGTERM/SIGINT into the container: docker exec passes
# no signal on. The launcher (pretrain/launch_signals.py) hands it to DeepSpeed's runner, whose pdsh
# handler signals every node's ranks (DeepSpeed gives them 30 s to save before it kills them).
run_passing_signals() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then run "$@"; return; fi
  "$@" &
  local pid=$! rc
  # The trap string is expanded when the trap runs; \$(cat ...) only inside the container.
  # shellcheck disable=SC2016
  trap 'docker exec "$SSHD_NAME" bash -c "kill -s TERM \$(cat $LAUNCH_PID_FILE)"' TERM INT
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break   # wait returned because the launch ended, not for a trap
  done
  trap - TERM INT
  return "$rc"
}

# What every training container needs on a GPU cluster: all GPUs, the host network (NCCL over
# InfiniBand/RoCE and the rendezvous port), host IPC (shared memory for NCCL and data loaders),
# locked memory for RDMA, the InfiniBand devices when present, data and checkpoints from shared storage.
docker_common() {
  local args=(--gpus all --network host --ipc host
              --ulimit memlock=-1 --ulimit stack=67108864 --cap-add IPC_LOCK
              -v "$DATA_DIR:/data" -v "$CKPT_DIR:/checkpoints"
              -v "$HOSTFILE:/workspace/hostfile:ro")
  [[ -e /dev/infiniband ]] && args+=(--device /dev/infiniband)
  local var
  for var in $(compgen -e); do
    case "$var" in NCCL_*|TORCH_NCCL_*|CUDA_DEVICE_MAX_CONNECTIONS) args+=(-e "$var") ;; esac
  done
  printf '%s\n' "${args[@]}"
}

# Expanded inside the sshd container, not here.
# shellcheck disable=SC2016
SSHD_SCRIPT='env | grep -E "^(PATH|LD_LIBRARY_PATH|CUDA_|NCCL_|TORCH_NCCL_|PKM_|NVIDIA_|PYTHON)" > /etc/environment
printf "Host *\n  Port %s\n  StrictHostKeyChecking accept-new\n" "$SSH_PORT" > /etc/ssh/ssh_config.d/pkm.conf
exec /usr/sbin/sshd -D -e -p "$SSH_PORT" -o StrictModes=no -o PermitRootLogin=prohibit-password'

need() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || { echo "launch_multinode.sh: set $name (see the header of $0)" >&2; exit 2; }
  done
}

train_args() {
  # The pretraining entry: deepspeed --module pretrain.main --deepspeed_config ... --config ... [overrides]
  printf '%s\n' --module pretrain.main --deepspeed_config "$DS_CONFIG" --config "$RUN_CONFIG"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  per-node)
    need NODE_RANK MASTER_ADDR DS_CONFIG RUN_CONFIG
    [[ -f "$HOSTFILE" || "${DRY_RUN:-0}" == "1" ]] || { echo "launch_multinode.sh: no hostfile at $HOSTFILE" >&2; exit 2; }
    mapfile -t common < <(docker_common)
    mapfile -t train < <(train_args)
    # --no_ssh: this node starts only its own ranks; --node_rank and --master_addr tell it its place.
    # The image's entrypoint runs deepspeed under the signal forwarding; exec: this script's pid
    # becomes docker run's, whose signal proxy hands SIGTERM/SIGINT to the container's PID 1.
    run_exec docker run --rm --name "pkm-train-$NODE_RANK" "${common[@]}" "$IMAGE" \
      deepspeed --hostfile /workspace/hostfile --no_ssh --node_rank "$NODE_RANK" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${train[@]}" "$@"
    ;;
  sshd)
    [[ -d "$SSH_DIR" || "${DRY_RUN:-0}" == "1" ]] || { echo "launch_multinode.sh: no ssh keys at $SSH_DIR" >&2; exit 2; }
    mapfile -t common < <(docker_common)
    # A long-lived container per node; pdsh on node 0 reaches it on SSH_PORT with the mounted keys.
    # ssh sessions do not inherit the image's ENV (PATH, LD_LIBRARY_PATH, ...), so it is written to
    # /etc/environment (read by pam_env) first; the client side learns the port and accepts the other
    # nodes' host keys on first contact. StrictModes=no: the mounted keys belong to the host user.
    run docker run -d --rm --name "$SSHD_NAME" "${common[@]}" -e SSH_PORT="$SSH_PORT" \
      -v "$SSH_DIR:/root/.ssh:ro" "$IMAGE" bash -c "$SSHD_SCRIPT"
    ;;
  pdsh)
    need DS_CONFIG RUN_CONFIG
    [[ -f "$HOSTFILE" ]] || { echo "launch_multinode.sh: no hostfile at $HOSTFILE" >&2; exit 2; }
    # Without --master_addr DeepSpeed takes the first address `hostname -I` prints on the first host,
    # which can be docker0's or a management network's: name it (the ranks rendezvous there).
    master_addr="${MASTER_ADDR:-$(first_host "$HOSTFILE")}"
    [[ -n "$master_addr" ]] || { echo "launch_multinode.sh: no host in $HOSTFILE; set MASTER_ADDR" >&2; exit 2; }
    mapfile -t train < <(train_args)
    # Runs inside node 0's sshd container. pdsh forwards only NCCL_*/PYTHON*/UCX* variables to the
    # other nodes; anything else (TORCH_NCCL_ASYNC_ERROR_HANDLING, ...) goes into .deepspeed_env.
    run_passing_signals docker exec -w /workspace/pkm "$SSHD_NAME" \
      python3 -m pretrain.launch_signals run --pid-file "$LAUNCH_PID_FILE" -- \
      deepspeed --hostfile /workspace/hostfile --ssh_port "$SSH_PORT" \
      --master_addr "$master_addr" --master_port "$MASTER_PORT" "${train[@]}" "$@"
    ;;
  ""|-h|--help|help) usage ;;
  *) echo "launch_multinode.sh: unknown mode '$cmd' (per-node | sshd | pdsh)" >&2; usage >&2; exit 2 ;;
esac
