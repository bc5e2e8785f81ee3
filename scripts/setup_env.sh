#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install hf_cft with its dev extras,
# pinned by constraints/dev.txt (CPU torch 2.13.0). Idempotent: reinstalls only when
# pyproject.toml or the constraints change. Environment: HF_CFT_VENV (default: .venv), PYTHON.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HF_CFT_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[hf_cft] creating virtual environment in $venv" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.hf_cft_install_stamp"
want="$(cat "$root/pyproject.toml" "$root/constraints/dev.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[hf_cft] installing hf_cft[dev] (pinned by constraints/dev.txt)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -c "$root/constraints/dev.txt" -e "$root[dev]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
