#!/usr/bin/env bash
# Launch `python -m trainer` with torchrun.
#
# One node (NNODES unset): every process on this machine, no rendezvous endpoint to set up:
#   NPROC_PER_NODE=2 launchers/torchrun.sh configs/experiments/tiny_open_clip_fsdp.yaml
#
# Several nodes, c10d rendezvous: run it once per node with the same arguments:
#   NNODES=2 NPROC_PER_NODE=8 NODE_RANK=<0|1> RDZV_ENDPOINT=<node0 address>:29400 \
#     launchers/torchrun.sh configs/experiments/vit_g_14_r1_fsdp.yaml run.dir=/shared/runs/x
#
# Everything after the script name goes to `python -m trainer` (experiment YAML, then key=value).
# Ctrl-C (or SIGTERM) stops training after the step in progress with a checkpoint; torchrun kills
# processes still running SHUTDOWN_TIMEOUT_S after it passed the signal on.
#
# Environment (required unless a default is shown):
#   NNODES          number of nodes (or MIN:MAX for an elastic range); unset: single node
#   RDZV_ENDPOINT   several nodes: host:port of the rendezvous store, on node 0; every node must reach it
#   NPROC_PER_NODE  processes per node (default: gpu = one per visible GPU; give a number on CPU)
#   NODE_RANK       0 on the node that hosts the store (default: $SLURM_NODEID, else unset: torchrun
#                   then guesses from the hostname whether it is that node)
#   RDZV_ID         job id shared by all nodes (default: $SLURM_JOB_ID, else dgmr)
#   LOCAL_ADDR      address the other nodes reach this node at (default: torchrun uses the FQDN)
#   NET_IF          network interface for NCCL and gloo traffic (sets NCCL_SOCKET_IFNAME and
#                   GLOO_SOCKET_IFNAME unless those are set themselves)
#   MAX_RESTARTS    whole-job restarts by torchrun after a worker fails (default 0: fail fast)
#   SHUTDOWN_TIMEOUT_S  seconds a stopped run gets to save its checkpoint (default 300)
#   OMP_NUM_THREADS CPU threads per process (default: cores / NPROC_PER_NODE when that is a number)
#   TORCHRUN        the torchrun executable (default: torchrun from PATH)
set -euo pipefail

NPROC_PER_NODE="${NPROC_PER_NODE:-gpu}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-dgmr}}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
SHUTDOWN_TIMEOUT_S="${SHUTDOWN_TIMEOUT_S:-300}"
TORCHRUN="${TORCHRUN:-torchrun}"

# Both libraries otherwise pick the interface the hostname resolves to, which on clusters with a
# management network (or in a network namespace) is not the one the peers can reach.
if [[ -n "${NET_IF:-}" ]]; then
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$NET_IF}"
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NET_IF}"
fi

# torchrun forces OMP_NUM_THREADS=1 when it is unset, which starves the data pipeline's decode;
# share the cores between the local processes instead.
if [[ -z "${OMP_NUM_THREADS:-}" && "$NPROC_PER_NODE" =~ ^[0-9]+$ ]]; then
  export OMP_NUM_THREADS=$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))
fi

if [[ -z "${NNODES:-}" ]]; then
  # Single node: torchrun's standalone mode runs its own rendezvous on a free local port.
  cmd=("$TORCHRUN" --standalone --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS"
       --shutdown-timeout "$SHUTDOWN_TIMEOUT_S" -m trainer "$@")
  echo "+ $(printf '%q ' "${cmd[@]}")" >&2
  exec "${cmd[@]}"
fi
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous store on node 0 (or leave NNODES unset: one node)}"

rdzv_conf=""
if [[ -n "$NODE_RANK" ]]; then
  # Say explicitly which node hosts the store: the hostname heuristic fails on multi-homed nodes.
  if [[ "$NODE_RANK" == 0 ]]; then rdzv_conf="is_host=1"; else rdzv_conf="is_host=0"; fi
fi

cmd=("$TORCHRUN"
     --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
     --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID"
     --max-restarts "$MAX_RESTARTS" --shutdown-timeout "$SHUTDOWN_TIMEOUT_S")
[[ -n "$rdzv_conf" ]] && cmd+=(--rdzv-conf "$rdzv_conf")
# The address rank 0 publishes to the workers of every node; the FQDN may resolve to an unreachable one.
[[ -n "${LOCAL_ADDR:-}" ]] && cmd+=(--local-addr "$LOCAL_ADDR")
cmd+=(-m trainer "$@")

echo "+ $(printf '%q ' "${cmd[@]}")" >&2
exec "${cmd[@]}"
