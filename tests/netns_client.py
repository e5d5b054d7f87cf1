"""A client run inside a network namespace by tests/test_multihost.py (the test process
itself stays in the host's): `status` prints the status JSON; `generate` runs greedy jobs
one after the other, printing `token N` as tokens arrive and one JSON line per job with
its status code and token ids."""
from __future__ import annotations

import argparse
import json
import sys

import grpc

from pdserve.client import status
from pdserve.common.config import ClientConfig
from pdserve.common.flags import add_flags, from_args
from pdserve.v1 import api_pb2, api_pb2_grpc
from pdserve.wire.security import Credentials


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["status", "generate"])
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--jobs", default="[]", help="JSON list of [prompt ids, max tokens]")
    add_flags(ap, ClientConfig)
    a = ap.parse_args()
    creds = Credentials.client(from_args(ClientConfig, a))
    if a.command == "status":
        print(json.dumps(status(a.coordinator, timeout=3.0, creds=creds)))
        return 0
    with creds.sync_channel(a.coordinator) as ch:
        stub = api_pb2_grpc.GenerationStub(ch)
        for prompt, max_tokens in json.loads(a.jobs):
            req = api_pb2.GenerateRequest(sampling=api_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                          ignore_eos=True))
            req.token_ids.ids.extend(prompt)
            tokens, code, details = [], "OK", ""
            try:
                for resp in stub.Generate(req, timeout=60.0, metadata=creds.metadata()):
                    tokens.extend(resp.token_ids)
                    if resp.token_ids:
                        print(f"token {len(tokens)}", flush=True)
            except grpc.RpcError as e:
                code, details = e.code().name, e.details()
            print(json.dumps({"code": code, "details": details, "token_ids": tokens}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
