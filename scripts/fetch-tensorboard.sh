#!/usr/bin/env bash
# A Python with TensorBoard (from PyPI) for the test that reads runner's
# event files with TensorBoard's own reader (tests/training/tracking.rs):
#   scripts/fetch-tensorboard.sh [DIR]   (default: target/tensorboard-venv)
# prints the venv's python; nothing of it is committed.
set -euo pipefail
DIR="${1:-target/tensorboard-venv}"
if [ -x "$DIR/bin/python" ] && "$DIR/bin/python" -c "import tensorboard" 2>/dev/null; then
  echo "$DIR/bin/python"
  exit 0
fi
PYTHON="$(command -v python3 || command -v python || true)"
if [ -z "$PYTHON" ]; then
  echo "fetch-tensorboard: needs python3" >&2
  exit 3
fi
"$PYTHON" -m venv "$DIR" >&2
"$DIR/bin/python" -m pip install --quiet tensorboard==2.21.0 >&2
echo "$DIR/bin/python"
