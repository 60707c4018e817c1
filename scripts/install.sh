#!/usr/bin/env bash
# Installs block_attn from this checkout into the current Python environment.
# Installs torch==2.13.0 (CPU build) first when no torch is present, then builds the extension
# against that torch (--no-build-isolation: an isolated build would pull a second multi-GB torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "no torch found: installing torch==2.13.0 (CPU build)"
  "$PYTHON" -m pip install --quiet torch==2.13.0
fi
"$PYTHON" -m pip install --quiet "setuptools>=64" wheel ninja pytest expecttest numpy matplotlib tqdm
"$PYTHON" -m pip install --quiet --no-build-isolation --no-deps -e .
"$PYTHON" -c "import block_attn; print('block_attn built:', block_attn.build_info())"
