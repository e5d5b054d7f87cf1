"""OpenAI response bodies: whole (stream false) and as server-sent-event chunks
(`data: {...}` lines, `data: [DONE]` last), for completions and chat completions."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from pdserve.v1 import api_pb2

FINISH = {api_pb2.FINISH_REASON_STOP: "stop", api_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass
class Choice:
    """What one choice has produced so far."""
    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    finish: str | None = None

    def add(self, resp: api_pb2.GenerateResponse) -> None:
        if resp.prompt_tokens:
            self.prompt_tokens, self.prompt_token_ids = resp.prompt_tokens, list(resp.prompt_token_ids)
        self.text.append(resp.text)
        self.token_ids.extend(resp.token_ids)
        if resp.finish_reason:
            self.finish = FINISH.get(resp.finish_reason, "stop")


class Reply:
    """The response of one HTTP request: its id, kind (chat or completion) and model."""

    def __init__(self, chat: bool, model: str, n: int, token_ids: bool):
        self.chat, self.model, self.n, self.token_ids = chat, model, n, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self, choices: list[Choice]) -> dict:
        """Prompt tokens count once per prompt (not once per choice of it)."""
        prompt = sum(c.prompt_tokens for c in choices if c.index % self.n == 0)
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, choices: list[Choice]) -> dict:
        out = []
        for c in choices:
            item = {"index": c.index, "logprobs": None, "finish_reason": c.finish}
            if self.chat:
                item["message"] = {"role": "assistant", "content": "".join(c.text)}
            else:
                item["text"] = "".join(c.text)
            if self.token_ids:
                item.update(token_ids=c.token_ids, prompt_token_ids=c.prompt_token_ids)
            out.append(item)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": out, "usage": self.usage(choices)}

    # streaming

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def first(self, index: int) -> bytes:
        """A chat choice's first chunk names the role (as OpenAI's does); completions have none."""
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) if self.chat else b""

    def delta(self, index: int, resp: api_pb2.GenerateResponse, finish: str | None) -> bytes:
        """The chunk of one response of a choice: its text, and its finish reason if it is the last."""
        if not resp.token_ids and not resp.text and finish is None:
            return b""
        item = {"index": index, "logprobs": None, "finish_reason": finish}
        if self.chat:
            item["delta"] = {"content": resp.text} if resp.text or resp.token_ids else {}
        else:
            item["text"] = resp.text
        if self.token_ids:
            item["token_ids"] = list(resp.token_ids)
            if resp.prompt_tokens:
                item["prompt_token_ids"] = list(resp.prompt_token_ids)
        return self._chunk([item])

    def usage_chunk(self, choices: list[Choice]) -> bytes:
        """stream_options.include_usage: a last chunk with no choices and the usage."""
        return self._chunk([], self.usage(choices))

    @staticmethod
    def error_chunk(body: dict) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
