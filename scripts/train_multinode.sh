#!/usr/bin/env bash
# Run train.py on several nodes with accelerate (DDP by default, DeepSpeed with ACCELERATE_CONFIG).
# Start the same command on every node; all arguments go to train.py:
#
#   # node 0 (MAIN_PROCESS_IP is its address), then node 1, ... with MACHINE_RANK=1, ...
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 GPUS_PER_NODE=8 \
#     bash scripts/train_multinode.sh --task train --model ... --cache_path /shared/cache --output_path /shared/run
#
#   # or a hostfile (one hostname or IP per line, node 0 first): the node count and the main IP come
#   # from it, and each node finds its own rank by matching `hostname` (or set MACHINE_RANK).
#   HOSTFILE=hosts.txt bash scripts/train_multinode.sh --task data_process ...
#
# --cache_path, --output_path and the dataset must be on a filesystem every node sees: stage I ranks
# write shards there and rank 0 merges them; checkpoints are assembled there by all ranks.
# FSDP2: ACCELERATE_CONFIG=scripts/accelerate_fsdp2.yaml. DeepSpeed: ACCELERATE_CONFIG=scripts/accelerate_deepspeed_zero2.yaml
# (or zero3; needs pip install --no-build-isolation -e .[deepspeed]). One machine, two "nodes" (what the tests run):
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=127.0.0.1 GPUS_PER_NODE=1 bash scripts/train_multinode.sh ... &
#   NUM_MACHINES=2 MACHINE_RANK=1 MAIN_PROCESS_IP=127.0.0.1 GPUS_PER_NODE=1 bash scripts/train_multinode.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-scripts/accelerate_ddp.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

if [ -n "${HOSTFILE:-}" ]; then
  mapfile -t HOSTS < <(grep -v '^[[:space:]]*\(#\|$\)' "$HOSTFILE" | awk '{print $1}')
  NUM_MACHINES=${NUM_MACHINES:-${#HOSTS[@]}}
  MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-${HOSTS[0]}}
  if [ -z "${MACHINE_RANK:-}" ]; then
    for i in "${!HOSTS[@]}"; do
      case "${HOSTS[$i]}" in
        "$(hostname)" | "$(hostname -s)" | "$(hostname -f 2>/dev/null || true)") MACHINE_RANK=$i ;;
      esac
    done
    for ip in $(hostname -I 2>/dev/null || true); do
      for i in "${!HOSTS[@]}"; do [ "${HOSTS[$i]}" = "$ip" ] && MACHINE_RANK=$i; done
    done
  fi
fi
: "${NUM_MACHINES:?set NUM_MACHINES (or HOSTFILE)}"
: "${MACHINE_RANK:?set MACHINE_RANK (0 on the main node), or list this host in HOSTFILE}"
: "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP to the address of node 0 (or HOSTFILE)}"

echo "node $MACHINE_RANK of $NUM_MACHINES, main $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT, $GPUS_PER_NODE GPUs per node" >&2
exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
  --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
  --num_processes $((NUM_MACHINES * GPUS_PER_NODE)) \
  train.py "$@"
