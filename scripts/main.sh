#!/usr/bin/env bash
# The project's main job (README): set up the environment, then launch the main recipe with
# accelerate on its embedded offline default. Extra arguments go to the recipe.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
recipe="${HF_CFT_MAIN_RECIPE:-recipes/mergetune.py}"
# accelerate launch without --cpu sets OMP_NUM_THREADS=1 on a machine without a GPU: give the process the cores
threads="${OMP_NUM_THREADS:-$(nproc)}"
exec "$venv/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    --num_cpu_threads_per_process "$threads" "$recipe" "$@"
