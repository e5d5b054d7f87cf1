"""The OpenAI request bodies this server takes, and the coordinator requests they become.

Every field is typed strictly (a string where a number belongs is a 400, as with
OpenAI) and unknown fields are refused. Fields of the OpenAI API the engine cannot
honour (logprobs, logit_bias, tools, echo, suffix, best_of > n) are accepted by name
but refused when set, so nothing a client asks for is silently ignored."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from pdserve.coordinator.http.errors import ApiError
from pdserve.v1 import api_pb2

MAX_CHOICES = 128  # prompts x n of one HTTP request at most


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What /v1/completions and /v1/chat/completions share."""
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None                 # echoed as the coordinator request's client_tag
    logit_bias: dict[str, float] | None = None
    # common extensions (vLLM, SGLang)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False          # each choice also carries its token ids (vLLM's name)

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias")
        if self.n < 1:
            raise ApiError(400, f"n must be >= 1, got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")

    def sampling(self, max_tokens: int, choice: int) -> api_pb2.SamplingParams:
        """The wire's sampling params for choice `choice` (of n): a seeded request's choices
        draw with seed, seed + 1, ... so that they differ and each is reproducible."""
        s = api_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=self.ignore_eos)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                setattr(s, name, value)
        if self.seed is not None:
            if not 0 <= self.seed < 2**63 - MAX_CHOICES:
                raise ApiError(400, f"seed must be in [0, 2^63), got {self.seed}", "seed")
            s.seed = self.seed + choice
        if self.stop is not None:
            s.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        if self.stop_token_ids:
            s.stop_token_ids.extend(self.stop_token_ids)
        return s

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def requests(self) -> list[api_pb2.GenerateRequest]:
        """One coordinator request per (prompt, choice), prompt-major: choice index i * n + j."""
        self.refuse_unsupported()
        if self.logprobs is not None:
            raise ApiError(400, "logprobs are not supported", "logprobs")
        if self.echo:
            raise ApiError(400, "echo is not supported", "echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported", "best_of")
        if self.max_tokens is None:
            raise ApiError(400, "max_tokens must be a number", "max_tokens")
        p = self.prompt
        prompts = [p] if isinstance(p, str) or not p or isinstance(p[0], int) else p
        if len(prompts) * self.n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n={self.n} exceeds {MAX_CHOICES} choices", "n")
        out = []
        for prompt in prompts:
            for j in range(self.n):
                req = api_pb2.GenerateRequest(model=self.model or "", sampling=self.sampling(self.max_tokens, j),
                                              client_tag=self.user or "")
                if isinstance(prompt, str):
                    req.text = prompt.encode()
                else:
                    req.token_ids.ids.extend(prompt)
                out.append(req)
        return out


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(Strict):
    type: Literal["text"]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def requests(self) -> list[api_pb2.GenerateRequest]:
        """One coordinator request per choice; without a token limit each may run to the
        end of the context (max_tokens 0 on the wire: Coordinator.generate's open_ended)."""
        self.refuse_unsupported()
        if self.logprobs or self.top_logprobs is not None:
            raise ApiError(400, "logprobs are not supported", "logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tools are not supported", "tools")
        if self.n > MAX_CHOICES:
            raise ApiError(400, f"n must be <= {MAX_CHOICES}, got {self.n}", "n")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if limit is not None and limit < 1:  # 0 means open-ended on the wire: refuse it here
            raise ApiError(400, f"max_tokens must be >= 1, got {limit}", "max_tokens")
        out = []
        for j in range(self.n):
            req = api_pb2.GenerateRequest(model=self.model or "", sampling=self.sampling(limit or 0, j),
                                          client_tag=self.user or "")
            for m in self.messages:
                req.chat.messages.add(role=m.role, content=m.text())
            out.append(req)
        return out
