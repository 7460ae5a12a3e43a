#!/usr/bin/env bash
# Creates .venv (once) and installs terarec with its test tools into it. Sourced by the other scripts.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
if ! python -c "import terarec.platform.cli, pytest, triton" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: a CPU machine takes the CPU build; GPU machines get CUDA wheels from PyPI.
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev]"
fi
