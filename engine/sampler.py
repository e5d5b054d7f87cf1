"""Turns a batch of logits into next tokens, honouring each request's SamplingParams."""
from __future__ import annotations

import torch

from pdserve.common.sampling import SamplingParams


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A seeded generator for one request, or None to use the global RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """First index of each row's maximum; on CUDA a two-stage Triton kernel (torch's
    one-block reduction over a large vocab is latency bound)."""
    if logits.is_cuda and logits.dim() == 2 and logits.numel() > 0:
        from pdserve.engine.triton_ops import argmax
        return argmax(logits)
    return logits.argmax(-1)


class Sampler:

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                 output_ids: list[list[int]], generators: list[torch.Generator | None]) -> torch.Tensor:
        if any(p.has_penalties for p in params):
            logits = self.apply_penalties(logits.to(torch.float32, copy=True), params, prompt_ids, output_ids)
        greedy_ids = _argmax(logits)  # without penalties: exactly the raw argmax
        if all(p.greedy for p in params):
            return greedy_ids.cpu()

        device = logits.device
        # Greedy rows get temperature 1 here; their sample is replaced by argmax below.
        temps = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        logits = logits.float() / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            logits = self.apply_filters(logits, params)
        probs = logits.softmax(-1)

        # Exponential race: argmax(probs / q), q ~ Exp(1), samples from probs. Each row draws
        # its q with its own generator, so a seeded row is independent of the rest of the batch.
        q = torch.ones_like(probs)
        for i, (p, generator) in enumerate(zip(params, generators)):
            if not p.greedy:
                q[i].exponential_(generator=generator)
        sampled_ids = probs.div(q).argmax(-1)
        greedy = torch.tensor([p.greedy for p in params], device=device)
        return torch.where(greedy, greedy_ids, sampled_ids).cpu()

    @staticmethod
    def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                        output_ids: list[list[int]]) -> torch.Tensor:
        """In place: repetition penalty over prompt+output, presence/frequency over output."""
        device, vocab_size = logits.device, logits.size(-1)
        for i, p in enumerate(params):
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(prompt_ids[i] + output_ids[i], dtype=torch.long, device=device).unique()
                x = logits[i, seen]
                logits[i, seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                out = torch.tensor(output_ids[i], dtype=torch.long, device=device)
                counts = torch.bincount(out, minlength=vocab_size).float()
                logits[i] -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
        return logits

    @staticmethod
    def apply_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """top-k, then top-p, then min-p, all on one descending sort; removed tokens get -inf."""
        device, vocab_size = logits.device, logits.size(-1)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        min_p = torch.tensor([p.min_p for p in params], device=device)

        sorted_logits, order = logits.sort(-1, descending=True)
        remove = torch.arange(vocab_size, device=device) >= top_k[:, None]
        sorted_logits.masked_fill_(remove, float("-inf"))
        probs = sorted_logits.softmax(-1)
        # Nucleus: drop a token once the mass ranked above it already reaches top_p
        # (the top token always stays). Rows with top_p == 1 skip this to avoid rounding.
        mass_above = probs.cumsum(-1) - probs
        remove |= (mass_above >= top_p[:, None]) & (top_p < 1.0)[:, None]
        # min-p is relative to the top token, so renormalising after top-k/top-p doesn't change it.
        remove |= probs < min_p[:, None] * probs[:, :1]
        sorted_logits.masked_fill_(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
