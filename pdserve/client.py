"""Client side of the API: `pdserve generate --coordinator` and `pdserve status`."""
from __future__ import annotations

import json
import sys
import time

import grpc

from pdserve.common.phases import decode_admission_s
from pdserve.wire.protocol import to_wire_params
from pdserve.wire.security import NONE, Credentials
from pdserve.v1 import api_pb2, api_pb2_grpc

FINISH_NAMES = {api_pb2.FINISH_REASON_STOP: "stop", api_pb2.FINISH_REASON_LENGTH: "length"}


def build_request(prompt: str | None, prompt_ids: list[int] | None, chat: bool, params, model: str = "") \
        -> api_pb2.GenerateRequest:
    req = api_pb2.GenerateRequest(model=model, sampling=to_wire_params(params))
    if prompt_ids is not None:
        req.token_ids.ids.extend(prompt_ids)
    elif chat:
        req.chat.messages.add(role="user", content=prompt or "")
    else:
        req.text = (prompt or "").encode("utf-8", "surrogateescape")
    return req


def generate(address: str, req: api_pb2.GenerateRequest, as_json: bool, timeout: float | None,
             creds: Credentials = NONE) -> int:
    """Stream one request; print text (or one JSON object); non-zero exit on a failed status."""
    sent = time.time()
    tokens, text, prompt_ids, finish, times, first_at = [], [], [], 0, None, None
    with creds.sync_channel(address) as ch:
        stub = api_pb2_grpc.GenerationStub(ch)
        try:
            for resp in stub.Generate(req, timeout=timeout, metadata=creds.metadata()):
                if resp.prompt_token_ids:
                    prompt_ids = list(resp.prompt_token_ids)
                if resp.token_ids and first_at is None:
                    first_at = time.time()
                if resp.index != len(tokens) and resp.token_ids:
                    raise RuntimeError(f"token stream gap: got index {resp.index}, expected {len(tokens)}")
                tokens.extend(resp.token_ids)
                text.append(resp.text)
                if not as_json and resp.text:
                    print(resp.text, end="", flush=True)
                if resp.finish_reason:
                    finish, times = resp.finish_reason, resp.times
        except grpc.RpcError as e:
            if not as_json:
                print()
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    done = time.time()
    n = len(tokens)
    timings = {"ttft_s": (first_at - sent) if first_at else None, "e2e_s": done - sent,
               "tpot_s": (done - first_at) / (n - 1) if first_at and n > 1 else None}
    if times is not None:
        t = times
        timings["server"] = {"queue_s": t.reserved - t.received, "prefill_s": t.prefill_end - t.prefill_start,
                             "transfer_s": (t.transfer_end - t.prefill_end) if t.transfer_end else 0.0,
                             "decode_admission_s": decode_admission_s(t),
                             "ttft_s": t.first_token - t.received, "e2e_s": t.finished - t.received}
    if as_json:
        print(json.dumps({"text": "".join(text), "token_ids": tokens, "prompt_token_ids": prompt_ids,
                          "finish_reason": FINISH_NAMES.get(finish, ""), "timings": timings}))
    else:
        print()
        tpot = f", tpot={timings['tpot_s'] * 1e3:.1f} ms" if timings["tpot_s"] else ""
        print(f"[{n} tokens, finish={FINISH_NAMES.get(finish, '')}, ttft={timings['ttft_s'] * 1e3:.0f} ms{tpot}]",
              file=sys.stderr)
    return 0


def status(address: str, timeout: float = 10.0, creds: Credentials = NONE) -> dict:
    with creds.sync_channel(address) as ch:
        resp = api_pb2_grpc.GenerationStub(ch).Status(api_pb2.StatusRequest(), timeout=timeout,
                                                      metadata=creds.metadata())
    return {"model": resp.model, "vocab_size": resp.vocab_size, "max_model_len": resp.max_model_len, "nodes": [
        {"id": n.id, "role": api_pb2.Role.Name(n.role).removeprefix("ROLE_").lower(), "address": n.address,
         "healthy": n.healthy, "tp": n.tp, "kv_blocks_free": n.kv_blocks_free, "kv_blocks_total": n.kv_blocks_total,
         "running": n.running, "queued": n.queued, "kv_transport": n.kv_transport, "cached_blocks": n.cached_blocks,
         "counters": {f.name: getattr(n.counters, f.name) for f in n.counters.DESCRIPTOR.fields}}
        for n in resp.nodes],
            "workers": [{"index": w.index, "pid": w.pid, "ready": w.ready, "served": w.served, "inflight": w.inflight,
                         "restarts": w.restarts} for w in resp.workers]}
