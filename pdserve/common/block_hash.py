"""Prefix-cache block hashes, torch-free so the coordinator computes the same ones.

A full block of block_size tokens is keyed by a 128-bit xxh3 hash of its tokens chained
over its prefix's hash; the chain starts from a root that names the model, dtype and
block size, so KV is never shared between different models or layouts."""
from __future__ import annotations

from array import array

import xxhash

MASK64 = (1 << 64) - 1


def root_hash(identity: str) -> int:
    """The chain's start for a model identity (checkpoint, dtype, block size, ...)."""
    return xxhash.xxh3_128_intdigest(identity.encode())


def chain(parent: int, tokens) -> int:
    """The hash of one full block of `tokens` whose prefix hashes to `parent`."""
    return xxhash.xxh3_128_intdigest(parent.to_bytes(16, "little") + array("q", tokens).tobytes())


def extend(hashes: list[int], tokens, block_size: int, root: int, num_blocks: int) -> list[int]:
    """Grow `hashes` (those of tokens' leading full blocks, in order) in place to the first
    num_blocks full blocks of `tokens` (fewer if tokens are short); returns it."""
    num_blocks = min(num_blocks, len(tokens) // block_size)
    parent = hashes[-1] if hashes else root
    for b in range(len(hashes), num_blocks):
        parent = chain(parent, tokens[b * block_size:(b + 1) * block_size])
        hashes.append(parent)
    return hashes


def block_hashes(tokens, block_size: int, root: int) -> list[int]:
    """The hashes of every full block of `tokens`."""
    return extend([], tokens, block_size, root, len(tokens) // block_size)


def short(h: int) -> int:
    """A hash cut to 64 bits, for summaries sent to the coordinator (a collision there
    only misroutes; the engine itself matches whole hashes)."""
    return h & MASK64
