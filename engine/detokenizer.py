"""Streams generated text one token at a time, cutting at stop strings."""
from __future__ import annotations

# Ids of prompt context decoded in front of the first generated token, so that
# merges and leading spaces come out as they would in a full decode.
CONTEXT_IDS = 5


class IncrementalDetokenizer:
    """prefix_offset/read_offset incremental decoding.

    ids[prefix_offset:read_offset] is already-emitted context; each step decodes
    ids[prefix_offset:] and emits what the new ids add to it. A decode ending in
    "\\ufffd" (a partial UTF-8 character) is held until later tokens complete it.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids)
        self.prefix_offset = max(len(self.ids) - CONTEXT_IDS, 0)
        self.read_offset = len(self.ids)
        self.stop = list(stop)
        # Hold back enough characters that a stop string is never partly emitted.
        self.hold = max(map(len, self.stop), default=1) - 1
        self.text = ""  # all generated text so far, cut at a stop string
        self.emitted = 0  # how many characters of text were returned
        self.stopped = False

    def step(self, token_id: int) -> str:
        """Append one generated token; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self.advance(*self._decode_window())

    def windows(self) -> tuple[list[int], list[int]]:
        """The ids whose decodes advance() takes: the emitted context, and it with the new ids."""
        return self.ids[self.prefix_offset:self.read_offset], self.ids[self.prefix_offset:]

    def advance(self, prefix: str, new: str) -> str:
        """step()'s second half, given the decodes of windows()."""
        if len(new) <= len(prefix) or new.endswith("\ufffd"):
            return ""  # nothing visible yet, or an incomplete character
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._extend(new[len(prefix):], final=False)

    def flush(self) -> str:
        """The request ended without a stop string: return everything held back."""
        if self.stopped:
            return ""
        prefix, new = self._decode_window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._extend(new[len(prefix):], final=True)

    def _decode_window(self) -> tuple[str, str]:
        if self.prefix_offset == self.read_offset:
            return "", self._decode(self.ids[self.prefix_offset:])
        return self._decode(self.ids[self.prefix_offset:self.read_offset]), self._decode(self.ids[self.prefix_offset:])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _extend(self, delta: str, final: bool) -> str:
        # A stop string completed by delta starts at or after `start`; earlier ones were found before.
        start = max(len(self.text) - self.hold, 0)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = final = True
        end = len(self.text) if final else max(len(self.text) - self.hold, self.emitted)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta


def step_all(dets: list[IncrementalDetokenizer], tokens: list[int]) -> list[str]:
    """step() of many detokenizers (one tokenizer, no stop strings) at once: every window
    decoded in one batched call of the tokenizer's backend."""
    if not dets:
        return []
    for det, token in zip(dets, tokens):
        det.ids.append(token)
    wins = [det.windows() for det in dets]
    texts = batch_decoder(dets[0].tokenizer, dets[0].skip_special_tokens)([w for pair in wins for w in pair])
    return [det.advance(texts[2 * i], texts[2 * i + 1]) for i, det in enumerate(dets)]


def batch_decoder(tokenizer, skip_special_tokens: bool):
    """lists of ids -> their texts, as tokenizer.decode gives each: the Rust backend's
    decode_batch where decode adds no Python post-processing, else decode one by one."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch") and not getattr(
            tokenizer, "clean_up_tokenization_spaces", False):
        return lambda batch: backend.decode_batch(batch, skip_special_tokens=skip_special_tokens)
    return lambda batch: [tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]
