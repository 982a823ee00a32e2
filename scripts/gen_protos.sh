#!/usr/bin/env bash
# Regenerates the committed Python stubs from proto/ with the pinned grpcio-tools and
# mypy-protobuf (the .pyi type stubs for messages and services).
# core/_gen/switchboard/ is the root of the installed `switchboard` package: the stubs
# (`switchboard.v1`), the root `__init__.py`, `py.typed` and `client.py` (the typed
# client, re-exported from switchboard.core.client) are all written here, so an
# internal service writes `from switchboard.v1 import inference_pb2_grpc` and
# `from switchboard.client import Client`. pyproject.toml maps core/ and facade/ to
# `switchboard.core` and `switchboard.facade` under the same root.
# Usage: scripts/gen_protos.sh          (rewrite core/_gen)
#        scripts/gen_protos.sh --check  (fail if the committed stubs differ)
set -euo pipefail
cd "$(dirname "$0")/.."
# Both generators are pinned here and in pyproject's dev extra: a different version writes
# different bytes, and --check would then report stale stubs that are not.
for pin in grpcio-tools==1.85.1 mypy-protobuf==5.1.0; do
  dist=${pin%%==*} want=${pin##*==}
  have=$(python -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null || echo none)
  if [ "$have" != "$want" ]; then
    echo "gen_protos: $dist $have installed, $want pinned (pip install -e '.[dev]')" >&2
    exit 2
  fi
done
# The mypy-protobuf plugins live beside this Python (the venv's bin), found without relying on PATH.
bin=$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
out=core/_gen
if [ "${1:-}" = "--check" ]; then out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
rm -rf "$out/switchboard"
mkdir -p "$out/switchboard/v1"
# Type stubs come from mypy-protobuf only (one source of .pyi): `--mypy_out` types the messages
# (field presence, enum value types, HasField/WhichOneof literals), which protoc's own --pyi_out
# does less precisely, and `--mypy_grpc_out` types the service stubs and servicers, which
# --pyi_out does not cover at all. `quiet` drops the plugin's notes on stderr.
python -m grpc_tools.protoc -I proto \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  proto/switchboard/v1/*.proto
printf '"""Switchboard, an LLM gateway: switchboard.core (the routing core), switchboard.facade\n(the REST surfaces), switchboard.v1 (the generated gRPC stubs), switchboard.client."""\n' > "$out/switchboard/__init__.py"
: > "$out/switchboard/py.typed"
cat > "$out/switchboard/client.py" <<'PY'
"""The typed gRPC client for internal services (implemented in switchboard.core.client)."""

from switchboard.core.client import *  # noqa: F403
from switchboard.core.client import __all__ as __all__
PY
printf '"""Generated from proto/switchboard/v1 by scripts/gen_protos.sh; do not edit."""\n' > "$out/switchboard/v1/__init__.py"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r "$out/switchboard" core/_gen/switchboard; then
    echo "gen_protos: core/_gen is stale; run scripts/gen_protos.sh and commit" >&2
    exit 1
  fi
  echo "gen_protos: committed stubs match proto/"
fi
