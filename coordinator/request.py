"""One request's lifecycle on the coordinator, and turning a client request into
prompt token ids the cluster can run (validation happens here, before any work)."""
from __future__ import annotations

import asyncio
import time

import grpc

from pdserve.common.model_files import chat_prompt
from pdserve.common.sampling import validate_request
from pdserve.coordinator import metrics
from pdserve.wire.protocol import to_engine_params
from pdserve.wire.rpc import RpcError
from pdserve.v1 import api_pb2, node_pb2

TERMINAL = ("FINISHED", "CANCELLED", "FAILED")


def prepare(req: api_pb2.GenerateRequest, tokenizer, model: node_pb2.ModelInfo,
            max_tokens_limit: int, open_ended: bool = False) -> tuple[list[int], object]:
    """Prompt ids and engine sampling params; ValueError/RpcError for a bad request.
    open_ended: max_tokens 0 becomes the rest of the context (an HTTP chat without max_tokens)."""
    if req.model and req.model != model.name:
        raise RpcError(grpc.StatusCode.NOT_FOUND, f"model {req.model!r} is not served here "
                                                  f"(serving {model.name or 'the default model'!r})")
    if not req.HasField("sampling"):
        raise ValueError("sampling.max_tokens is required")
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is empty")
    if kind == "token_ids":
        prompt = list(req.token_ids.ids)
    else:
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: send token_ids")
        if kind == "text":
            try:
                text = req.text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"prompt is not valid UTF-8: {e}") from None
            if not text:
                raise ValueError("prompt is empty")
            prompt = tokenizer.encode(text)
        else:
            messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
            if not messages:
                raise ValueError("chat prompt has no messages")
            prompt = chat_prompt(tokenizer, messages)
    if open_ended and req.sampling.max_tokens == 0:  # req.sampling is the record's: it sees the value too
        req.sampling.max_tokens = max(1, min(max_tokens_limit, model.max_model_len - len(prompt)))
    params = to_engine_params(req.sampling)
    validate_request(prompt, params, model.vocab_size, model.max_model_len, max_tokens_limit)
    return prompt, params


class RequestRecord:
    """State, timestamps and routing of one request (owned by the coordinator)."""

    def __init__(self, request_id: str, prompt: list[int], sampling: api_pb2.SamplingParams, client_tag: str,
                 deadline: float | None = None):
        self.id, self.prompt, self.sampling, self.client_tag = request_id, prompt, sampling, client_tag
        self.deadline = deadline             # time.monotonic() when the client's deadline passes; None: none
        self.times = api_pb2.PhaseTimes(received=time.time())
        self._state, self.stage = "", None   # stage: the gauge it counts in (coordinator/metrics.py)
        self.admitted = False                # the current decode node took it into its batch
        self.state = "QUEUED"
        self.failure_code = ""               # the status a FAILED request ended with
        self.last_token_at = 0.0             # time.time() the last token left for the client
        # decode tokens not yet written to the client (coordinator/tokens.py pushes them):
        # they leave coalesced into one response, and at most `bound` wait
        self.pending: list[int] = []
        self.pending_text: list[str] = []
        self.node_finish = 0                 # the finish reason the node sent
        self.error: RpcError | None = None   # the node failed the request
        self.received = 1                    # output index of the next token expected from the node
        self.wake = asyncio.Event()          # set when any of the above changed, or the node is lost
        self.decode = self.prefill = None
        self.ticket: node_pb2.Ticket | None = None
        self.tokens = 0
        self.generated: list[int] = []       # every token sent to the client, in order
        # what the cluster runs: the client's prompt, or after a migration the prompt plus
        # the tokens generated so far, whose first new token is output index `offset`
        self.run_prompt, self.run_sampling, self.offset = prompt, sampling, 0
        self.block_hashes: tuple | None = None  # routing: (key, run_prompt's 64-bit block hashes)
        self.attempt = 0                     # grows each time the request leaves a reservation
        self.key = f"{request_id}/0"         # the id the nodes know this attempt by (next_attempt)
        self.migrations = 0
        self.retries = 0                     # prefill-phase attempts that failed (node lost, transfer failed)
        self.lost = False                    # the current decode node is gone (relay() says so)
        self.alarm = asyncio.Event()         # set when a node this request depends on is lost
        self.reserving = set()               # decode nodes a Reserve was sent to and not yet answered
        self.writing_since: float | None = None  # monotonic time a write to the client began, while blocked
        self.task: asyncio.Task | None = None
        self.context = None                  # the client's call (grpc.aio context), to end it with a status
        self.cut = False                     # ended for a client that does not keep up

    def next_attempt(self) -> None:
        """A new key for the nodes: an abort of an earlier attempt, however late it
        arrives, never touches a later one."""
        self.attempt += 1
        self.key = f"{self.id}/{self.attempt}"

    def remaining(self) -> float | None:
        """Seconds left before the client's deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def decode_lost(self) -> None:
        """The decode node is gone: wake the request wherever it waits."""
        self.lost = True
        self.wake.set()
        self.alarm.set()

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        self._restage()

    def _restage(self) -> None:
        stage = metrics.stage_of(self._state, self.admitted)
        if stage != self.stage:
            metrics.moved(self.stage, stage)
            self.stage = stage

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def reserved(self, node, ticket: node_pb2.Ticket) -> None:
        self.state, self.decode, self.ticket = "RESERVED", node, ticket
        self.times.reserved = time.time()

    def prefilling(self, node) -> None:
        self.state, self.prefill = "PREFILLING", node
        self.times.prefill_start = time.time()

    def prefilled(self, resp: node_pb2.PrefillResponse) -> None:
        self.state = "DECODING"
        self.times.prefill_start, self.times.prefill_end = resp.prefill_start, resp.prefill_end
        self.times.transfer_end = resp.transfer_end

    def finish(self) -> None:
        self.state = "FINISHED"
        self.times.finished = time.time()

    def fail(self, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        self.failure_code = self.failure_code or code.name
        self.state = "FAILED"

    def cancel(self) -> None:
        self.state = "CANCELLED"

    def first_response(self, resp: node_pb2.PrefillResponse) -> api_pb2.GenerateResponse:
        self.times.first_token = time.time()
        self.tokens = 1
        self.generated.append(resp.first_token)
        return api_pb2.GenerateResponse(request_id=self.id, index=0, token_ids=[resp.first_token], text=resp.text,
                                        prompt_tokens=len(self.prompt), prompt_token_ids=self.prompt,
                                        client_tag=self.client_tag)

    def migrate(self) -> None:
        """The decode node is gone: run prompt + generated tokens again for the rest."""
        self.migrations += 1
        self.offset = len(self.generated)
        self.run_prompt = self.prompt + self.generated
        self.run_sampling = api_pb2.SamplingParams()
        self.run_sampling.CopyFrom(self.sampling)
        self.run_sampling.max_tokens = self.sampling.max_tokens - len(self.generated)
        self.unreserve()

    def unreserve(self) -> None:
        """Forget the decode reservation (gone, or to be made again elsewhere)."""
        self.decode, self.ticket, self.lost, self.admitted = None, None, False, False
        self.state = "QUEUED"
        self.next_attempt()
        self.pending, self.pending_text, self.node_finish, self.error = [], [], 0, None
        self.received = self.offset + 1  # the node's first token is the prefill node's, sent by us
        self.alarm.clear()

    def continued_response(self, resp: node_pb2.PrefillResponse) -> api_pb2.GenerateResponse:
        """The first token after a migration (output index `offset`)."""
        self.tokens += 1
        self.generated.append(resp.first_token)
        return api_pb2.GenerateResponse(request_id=self.id, index=self.offset, token_ids=[resp.first_token],
                                        text=resp.text)

    def push(self, index: int, tokens, text: str, finish: int, bound: int) -> bool:
        """A decode node's row for this request: `tokens` from its output index `index` (a
        node counts from the last migration). Duplicates are dropped; a gap fails the
        request. False when more than `bound` tokens would wait: nothing is taken."""
        index += self.offset
        if index < self.received:
            if index + len(tokens) > self.received:
                self.failed_on_node(grpc.StatusCode.INTERNAL.value[0], f"token stream overlap at index {index}")
            return True  # a duplicate (a node's first token, already sent)
        if index > self.received:
            self.failed_on_node(grpc.StatusCode.INTERNAL.value[0],
                                f"token stream gap: got index {index}, expected {self.received}")
            return True
        if len(self.pending) + len(tokens) > bound:
            return False
        self.pending.extend(tokens)
        self.pending_text.append(text)
        self.received += len(tokens)
        self.node_finish = self.node_finish or finish
        self.wake.set()
        return True

    def failed_on_node(self, code: int, message: str) -> None:
        if self.error is None:
            self.error = RpcError(_status(code), message)
        self.wake.set()

    def decode_started(self, decode_start: float, kv_ready: float) -> None:
        if not self.times.decode_start:
            self.times.decode_start = decode_start
            self.times.transfer_end = kv_ready or self.times.transfer_end  # the decode node's view
        self.admitted = True
        self._restage()

    async def relay(self):
        """Once something arrived: every pending token in one response (None if none),
        the finish reason, and whether the decode node was lost; raises a node's error."""
        while not (self.pending or self.node_finish or self.lost or self.error):
            self.wake.clear()
            await self.wake.wait()
        if self.error is not None:
            raise self.error
        tokens, text = self.pending, "".join(self.pending_text)
        self.pending, self.pending_text = [], []
        if not tokens:
            return None, self.node_finish, self.lost
        index = self.tokens
        self.tokens += len(tokens)
        self.generated.extend(tokens)
        return api_pb2.GenerateResponse(request_id=self.id, index=index, token_ids=tokens, text=text), \
            self.node_finish, self.lost

    def last_response(self, finish: int) -> api_pb2.GenerateResponse:
        return api_pb2.GenerateResponse(request_id=self.id, index=self.tokens, finish_reason=finish, times=self.times)


def _status(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.INTERNAL)
