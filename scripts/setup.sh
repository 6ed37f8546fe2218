#!/usr/bin/env bash
# Create .venv and install WarmFed-Sim with everything it needs, its `dev` extra (pytest, ruff,
# mypy) included; idempotent (fast when done).
#
# CPU machines: torch is pinned by constraints-cpu.txt (2.13.0, the CPU build on this
# platform's disk). GPU machines: install the CUDA torch you want into .venv first, then run
# with WARMFED_TORCH=keep so the pin is not applied, e.g.
#   python3 -m venv .venv && .venv/bin/pip install torch --index-url <your CUDA wheel index>
#   WARMFED_TORCH=keep make setup
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints-cpu.txt ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_args=(-q --disable-pip-version-check)
if [ "${WARMFED_TORCH:-cpu}" = "keep" ]; then
  "$VENV/bin/pip" install "${pip_args[@]}" -e ".[dev]"
else
  "$VENV/bin/pip" install "${pip_args[@]}" -c constraints-cpu.txt torch==2.13.0
  "$VENV/bin/pip" install "${pip_args[@]}" -c constraints-cpu.txt -e ".[dev]"
fi
touch "$stamp"
