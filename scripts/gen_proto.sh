#!/usr/bin/env bash
# Regenerate the Python stubs in pdserve/v1/ from proto/pdserve/v1/*.proto.
# tests/test_proto.py fails when the committed stubs drift from the .proto sources.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" proto/pdserve/v1/*.proto
