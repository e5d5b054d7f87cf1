"""A decode node's outputs, on its event loop rather than the engine's thread: the
engine hands over each step as columns (engine.llm_engine.StepBatch); here they get
their text (the sequences the engine does not detokenize, in one batched decode per
step) and become one columnar TokenBatch."""
from __future__ import annotations

from pdserve.engine.detokenizer import IncrementalDetokenizer, step_all
from pdserve.engine.llm_engine import StepBatch
from pdserve.wire.protocol import FINISH
from pdserve.v1 import node_pb2


class StepOutputs:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.detoks: dict[int, IncrementalDetokenizer] = {}   # seq_id -> its detokenizer, here

    def texts(self, batch: StepBatch, rows: list[int]) -> list[str]:
        """The text deltas of these rows of a step, as the engine's own detokenizer gives them;
        a finished row's detokenizer is forgotten."""
        out = [batch.texts[i] for i in rows]
        if self.tokenizer is None:
            return out
        dets, tokens, at, ends = [], [], [], []
        for j, i in enumerate(rows):
            seq = batch.seqs[i]
            if seq.detokenizer is not None:  # stop strings: the engine detokenized it
                continue
            det = self.detoks.get(seq.seq_id)
            if det is None:  # its first row here: the tokens before it are context already sent
                det = self.detoks[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
                for token in seq.output_token_ids[:batch.indices[i]]:
                    det.step(token)
            reason = batch.finish[i]
            if reason is not None:
                ends.append((j, seq.seq_id))
            if reason != "stop":  # without stop strings "stop" is a stop token: never detokenized
                dets.append(det)
                tokens.append(batch.token_ids[i])
                at.append(j)
        for j, delta in zip(at, step_all(dets, tokens)):
            out[j] = delta
        for j, seq_id in ends:
            out[j] += self.detoks.pop(seq_id).flush()
        return out

    def forget(self, seq) -> None:
        """A sequence that ends without a finished row (aborted)."""
        self.detoks.pop(seq.seq_id, None)

    def token_batch(self, batch: StepBatch, rows: list[int]) -> node_pb2.TokenBatch:
        """One TokenBatch of these rows (one token each); a request's row at output index 1
        carries the times it joined the batch as an event."""
        seqs, indices, finish = batch.seqs, batch.indices, batch.finish
        out = node_pb2.TokenBatch()
        out.request_ids.extend([seqs[i].request_id for i in rows])
        out.first_index.extend([indices[i] for i in rows])
        out.counts.extend([1] * len(rows))
        out.token_ids.extend([batch.token_ids[i] for i in rows])
        out.texts.extend(self.texts(batch, rows))
        out.finish_reasons.extend([0 if finish[i] is None else FINISH.get(finish[i], 0) for i in rows])
        for i in rows:
            if indices[i] == 1:
                seq = seqs[i]
                out.events.add(request_id=seq.request_id, decode_start=seq.decode_start, kv_ready=seq.kv_ready)
        return out


def error_batch(request_id: str, code, message: str) -> node_pb2.TokenBatch:
    """A batch that fails one request with a grpc status."""
    return node_pb2.TokenBatch(events=[node_pb2.TokenEvent(request_id=request_id, error=message,
                                                           error_code=code.value[0])])


def first_batch(out) -> node_pb2.TokenBatch:
    """The one row of a request that ended at its first token (a StepOutput)."""
    return node_pb2.TokenBatch(request_ids=[out.seq.request_id], first_index=[out.index], counts=[1],
                               token_ids=[out.token_id], texts=[out.text_delta],
                               finish_reasons=[FINISH.get(out.seq.finish_reason or "", 0)])
