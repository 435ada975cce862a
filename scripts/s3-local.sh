#!/usr/bin/env bash
# A local S3-compatible server on loopback (moto's server, from PyPI), for
# the remote-cache tests (tests/training/remote.rs) and for trying
# `[cache] remote` on one machine:
#   eval "$(scripts/s3-local.sh start [DIR])"   # default DIR: target/s3-local
#   runner --remote s3://runner-test/demo run recipes/demo.toml
#   scripts/s3-local.sh stop [DIR]
# `start` installs moto in DIR/venv (once), starts it on a free port, makes
# the bucket `runner-test` and prints the settings to export:
# AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
# RUNNER_TEST_S3 (the bucket's URL). Data lives in the server's memory only.
set -euo pipefail
ACTION="${1:-start}"
DIR="$(mkdir -p "${2:-target/s3-local}" && cd "${2:-target/s3-local}" && pwd)"
MOTO_VERSION=5.2.6

stop() {
  if [ -f "$DIR/pid" ]; then
    kill "$(cat "$DIR/pid")" 2>/dev/null || true
    rm -f "$DIR/pid"
  fi
}

case "$ACTION" in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "usage: scripts/s3-local.sh start|stop [DIR]" >&2; exit 2 ;;
esac

if ! "$DIR/venv/bin/python" -c "import moto, boto3" 2>/dev/null; then
  PYTHON="$(command -v python3 || true)"
  if [ -z "$PYTHON" ]; then
    echo "s3-local: needs python3 (with venv and pip)" >&2
    exit 3
  fi
  "$PYTHON" -m venv "$DIR/venv" >&2
  "$DIR/venv/bin/python" -m pip install --quiet "moto[server]==$MOTO_VERSION" >&2
fi
stop
PORT="$("$DIR/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
nohup "$DIR/venv/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$DIR/server.log" 2>&1 &
echo $! >"$DIR/pid"
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_ACCESS_KEY_ID=runner-test \
  AWS_SECRET_ACCESS_KEY=runner-test AWS_REGION=us-east-1
# Up within 30 s, or say why not.
for _ in $(seq 1 60); do
  if "$DIR/venv/bin/python" - <<'PY' 2>/dev/null
import os, boto3
boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="runner-test")
PY
  then
    echo "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_REGION=$AWS_REGION RUNNER_TEST_S3=s3://runner-test"
    exit 0
  fi
  sleep 0.5
done
echo "s3-local: the server did not start; its log ($DIR/server.log):" >&2
tail -20 "$DIR/server.log" >&2
stop
exit 3
