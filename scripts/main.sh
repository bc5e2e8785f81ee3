#!/usr/bin/env bash
# The project's main job (README): set up the environment, then launch the main recipe with
# accelerate on its embedded offline default. Extra arguments go to the recipe.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
recipe="${HF_CFT_MAIN_RECIPE:-recipes/mergetune.py}"
exec "$venv/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "$recipe" "$@"
