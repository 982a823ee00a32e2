#!/usr/bin/env bash
# Regenerates the committed Python stubs from proto/ with the pinned grpcio-tools.
# The stubs live in core/_gen/ and install as the `switchboard.v1` package, so an
# internal service writes `from switchboard.v1 import inference_pb2_grpc`.
# Usage: scripts/gen_protos.sh          (rewrite core/_gen)
#        scripts/gen_protos.sh --check  (fail if the committed stubs differ)
set -euo pipefail
cd "$(dirname "$0")/.."
PINNED_GRPCIO_TOOLS="1.85.1"
have=$(python -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')
if [ "$have" != "$PINNED_GRPCIO_TOOLS" ]; then
  echo "gen_protos: grpcio-tools $have installed, $PINNED_GRPCIO_TOOLS pinned (pip install -e '.[dev]')" >&2
  exit 2
fi
out=core/_gen
if [ "${1:-}" = "--check" ]; then out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
rm -rf "$out/switchboard"
mkdir -p "$out/switchboard/v1"
python -m grpc_tools.protoc -I proto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/switchboard/v1/*.proto
printf '"""Generated gRPC stubs for the Switchboard API (see proto/)."""\n' > "$out/switchboard/__init__.py"
printf '"""Generated from proto/switchboard/v1 by scripts/gen_protos.sh; do not edit."""\n' > "$out/switchboard/v1/__init__.py"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r "$out/switchboard" core/_gen/switchboard; then
    echo "gen_protos: core/_gen is stale; run scripts/gen_protos.sh and commit" >&2
    exit 1
  fi
  echo "gen_protos: committed stubs match proto/"
fi
