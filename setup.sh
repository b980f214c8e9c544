#!/usr/bin/env bash
# Idempotent set-up for development and CI: installs districompile (editable) with its test extras.
set -euo pipefail
cd "$(dirname "$0")"

# Install torch first and pinned: an unpinned torch (even via our own requirement) would pull
# the newest release with gigabytes of CUDA packages; 2.13.0 is the CPU build available here.
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[test]"
