"""The committed stubs in pdserve/v1/ are exactly what the .proto sources generate."""
from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto_sources(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"),
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
                   check=True, cwd=ROOT / "proto")
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc produced nothing"
    stale = [str(g) for g in generated if not (ROOT / g).exists() or not filecmp.cmp(tmp_path / g, ROOT / g, shallow=False)]
    assert not stale, f"stubs drifted from proto/ (run scripts/gen_proto.sh): {stale}"


def test_stubs_import_and_round_trip():
    from pdserve.v1 import api_pb2, kv_pb2
    req = api_pb2.GenerateRequest(text="héllo".encode(), sampling=api_pb2.SamplingParams(max_tokens=3, temperature=0.0))
    again = api_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert again.WhichOneof("prompt") == "text" and again.sampling.HasField("temperature")
    header = kv_pb2.KVHeader(transfer_id="t", shards=[kv_pb2.KVShard(tp_rank=1, head_start=2, num_heads=1)])
    assert kv_pb2.KVHeader.FromString(header.SerializeToString()).shards[0].head_start == 2
