#!/usr/bin/env bash
# Launch `python -m trainer` with the deepspeed launcher.
#
# One node (no HOSTFILE set): every process on this machine, no ssh, no hostfile:
#   NPROC_PER_NODE=2 launchers/deepspeed.sh configs/experiments/tiny_timm_zero3.yaml
#   (on GPUs NPROC_PER_NODE defaults to every visible GPU; on CPU set it, and DS_ACCELERATOR=cpu)
#
# Several nodes (HOSTFILE set), in one of two ways:
# 1. From one node, over ssh (pdsh) to every host in the hostfile ("worker-0 slots=8" per line):
#      HOSTFILE=hostfile MASTER_ADDR=worker-0 launchers/deepspeed.sh configs/experiments/eva02_e_r1.yaml
# 2. Without ssh (clusters that forbid it): run it on every node yourself, with that node's rank;
#    the hostfile is still read, for the node count and the slots per node (names are not contacted):
#      HOSTFILE=hostfile NO_SSH=1 NODE_RANK=<0..N-1> MASTER_ADDR=<node 0 address> launchers/deepspeed.sh ...
#
# Everything after the script name goes to `python -m trainer` (experiment YAML, then key=value).
# Ctrl-C (or SIGTERM) stops training after the step in progress with a checkpoint; the deepspeed
# launcher kills processes that have not exited 30 s after its own SIGTERM.
#
# Environment (required unless a default is shown):
#   HOSTFILE        MPI-style hostfile (deepspeed's own default /job/hostfile is never right here);
#                   unset: single node
#   NPROC_PER_NODE  single node only: processes (default: deepspeed's, one per visible GPU)
#   MASTER_ADDR     several nodes: address of node 0 that every node can reach (rank 0's TCP store
#                   listens there); single node: 127.0.0.1
#   MASTER_PORT     default 29500
#   NO_SSH          1: launch only this node's processes (needs NODE_RANK); default 0
#   NODE_RANK       this node's line in the hostfile, from 0 (NO_SSH=1 only)
#   NET_IF          network interface for NCCL and gloo (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME)
#   OMP_NUM_THREADS CPU threads per process (default: cores / processes of this node)
#   DEEPSPEED       the deepspeed launcher (default: deepspeed from PATH)
# Over ssh, the remote processes do NOT inherit this shell's environment: pdsh passes only NCCL_*,
# PYTHON*, UCX*, MV2*, MLFLOW* and the lines of ./.deepspeed_env or ~/.deepspeed_env (NAME=value);
# put GLOO_SOCKET_IFNAME, OMP_NUM_THREADS, DS_ACCELERATOR, HF_HOME... there.
set -euo pipefail

MASTER_PORT="${MASTER_PORT:-29500}"
NO_SSH="${NO_SSH:-0}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"

if [[ -z "${HOSTFILE:-}" ]]; then
  # Single node: without --hostfile (and with no /job/hostfile) deepspeed starts local processes only.
  cmd=("$DEEPSPEED" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT")
  if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || { echo "NPROC_PER_NODE=$NPROC_PER_NODE: not a number >= 1" >&2; exit 2; }
    cmd+=(--num_gpus "$NPROC_PER_NODE")
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"
  fi
  cmd+=(--module trainer "$@")
  echo "+ $(printf '%q ' "${cmd[@]}")" >&2
  exec "${cmd[@]}"
fi

: "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0 reachable from every node}"
[[ -f "$HOSTFILE" ]] || { echo "HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; }

# NCCL and gloo otherwise use the interface the hostname resolves to, often not the fast fabric.
if [[ -n "${NET_IF:-}" ]]; then
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$NET_IF}"
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NET_IF}"
fi

cmd=("$DEEPSPEED" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ "$NO_SSH" == 1 ]]; then
  : "${NODE_RANK:?NO_SSH=1 needs NODE_RANK, the line of this node in the hostfile, from 0}"
  cmd+=(--no_ssh --node_rank "$NODE_RANK")
  # Threads per process from this node's slots; over ssh, set it in .deepspeed_env instead.
  if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    slots=$(grep -v '^\s*#' "$HOSTFILE" | grep -v '^\s*$' | sed -n "$((NODE_RANK + 1))p" \
            | sed -n 's/.*slots=\([0-9]\+\).*/\1/p')
    export OMP_NUM_THREADS=$(( $(nproc) / ${slots:-1} > 0 ? $(nproc) / ${slots:-1} : 1 ))
  fi
fi
cmd+=(--module trainer "$@")

echo "+ $(printf '%q ' "${cmd[@]}")" >&2
exec "${cmd[@]}"
