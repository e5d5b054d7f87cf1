"""What every role agrees on: the protocol version, finish reasons, and the
conversion between the wire's SamplingParams and ours."""
from __future__ import annotations

from pdserve.common.sampling import SamplingParams
from pdserve.v1 import api_pb2

PROTOCOL_VERSION = 1

FINISH = {"stop": api_pb2.FINISH_REASON_STOP, "length": api_pb2.FINISH_REASON_LENGTH}


def to_engine_params(p: api_pb2.SamplingParams) -> SamplingParams:
    """Wire -> engine; unset optional fields take the engine defaults. Not validated here."""
    d = SamplingParams()
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature if p.HasField("temperature") else d.temperature,
        top_p=p.top_p if p.HasField("top_p") else d.top_p,
        top_k=p.top_k if p.HasField("top_k") else d.top_k,
        min_p=p.min_p if p.HasField("min_p") else d.min_p,
        seed=p.seed if p.HasField("seed") else None,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else d.repetition_penalty,
        presence_penalty=p.presence_penalty if p.HasField("presence_penalty") else d.presence_penalty,
        frequency_penalty=p.frequency_penalty if p.HasField("frequency_penalty") else d.frequency_penalty,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos)


def to_wire_params(p: SamplingParams) -> api_pb2.SamplingParams:
    out = api_pb2.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                 min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                                 presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                                 stop=p.stop, stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos)
    if p.seed is not None:
        out.seed = p.seed
    return out
