"""What both ends of a NCCL KV transfer compute the same way: how the layers are cut
into messages (layer_groups), and the per-layer checksum of a message (checksum) that
the receiver checks against the sender's tail (check_tail)."""
from __future__ import annotations

import torch

MAX_MESSAGES = 8  # per transfer and pair: each message costs the host time to issue


def layer_groups(num_layers: int, bytes_per_layer: int, min_message_bytes: int,
                 max_messages: int = MAX_MESSAGES) -> list[tuple[int, int]]:
    """Consecutive layer ranges [start, end), one message each: as many groups as keep every
    group at >= min_message_bytes (one group when the whole KV is smaller) and their number
    at most max_messages. From three groups on, the first and the last are the smallest
    allowed and the others even (sizes differing by at most one layer): the first gather
    and the last scatter, which nothing overlaps, stay short, and so does what is left to
    send after the last layer of a streamed prefill. Each message costs host time, so a
    large KV goes in a few large ones. A pure function of its arguments: both ends
    compute the same."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    per = max(1, -(-min_message_bytes // max(1, bytes_per_layer)))
    n = max(1, min(num_layers // per, max_messages))
    if n < 3:
        return _even(0, num_layers, n)
    return [(0, per), *_even(per, num_layers - per, n - 2), (num_layers - per, num_layers)]


def _even(start: int, end: int, n: int) -> list[tuple[int, int]]:
    base, extra = divmod(end - start, n)
    out = []
    for i in range(n):
        out.append((start, start + base + (i < extra)))
        start = out[-1][1]
    return out


def checksum(buf: torch.Tensor) -> torch.Tensor:
    """int64 [layers] of a gathered [layers, 2, n_blocks, ...] buffer, on its device: per
    layer, the sum over its k/v block rows of (row index + 1) x (the row's int32 words
    summed mod 2**32). One read of the buffer; it catches a wrong, truncated or misordered
    message, blocks in the wrong order and k swapped with v."""
    layers = buf.shape[0]
    rows = buf.reshape(layers * buf.shape[1] * buf.shape[2], -1)
    width = rows.shape[1] * rows.element_size()
    words = rows.view(torch.int32 if width % 4 == 0 else torch.int16 if width % 2 == 0 else torch.uint8)
    sums = words.sum(1, dtype=words.dtype).to(torch.int64).view(layers, -1)  # no int64 copy of the buffer
    weights = torch.arange(1, sums.shape[1] + 1, dtype=torch.int64, device=buf.device)
    return (sums * weights).sum(1)



def check_tail(pair: str, tail: list[int], sums: list[int], key: int, num_blocks: int, layers: int) -> str:
    """A received tail [key, n_blocks, num_layers, checksum per layer] against the transfer
    and the checksums of what arrived; the reason, "" when it matches."""
    want = [key, num_blocks, layers]
    if tail[:3] != want:
        return (f"pair {pair}: the tail says key {tail[0]}, {tail[1]} blocks, {tail[2]} layers; "
                f"expected key {want[0]}, {want[1]} blocks, {want[2]} layers")
    bad = [i for i in range(layers) if sums[i] != tail[3 + i]]
    if bad:
        return f"pair {pair}: checksum mismatch in layers {bad}"
    return ""
