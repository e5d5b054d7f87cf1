"""Automatic prefix caching: the block manager's cache, the scheduler linking cached
prefixes, and greedy parity with transformers when prompts share prefixes."""
from __future__ import annotations

import random

import pytest

from pdserve.common.block_hash import block_hashes, root_hash
from pdserve.common.config import EngineConfig
from pdserve.common.sampling import SamplingParams
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence
from tests.conftest import assert_matches_reference

ROOT = root_hash("test-model")
FAKE_TOKEN = 7


def seq(tokens, max_tokens=4) -> Sequence:
    return Sequence(list(tokens), SamplingParams(max_tokens=max_tokens))


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """s with its prompt's KV 'computed' into fresh blocks and registered."""
    s.block_table = bm.allocate(bm.blocks_for(s.num_tokens))
    s.num_computed_tokens = s.num_tokens
    bm.cache_full(s)
    return s


def test_hash_chain_depends_on_the_prefix_and_the_root():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, ROOT)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4, ROOT)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]      # same second block, different prefix
    assert block_hashes([1, 2, 3, 4, 5, 6, 7], 4, ROOT) == a[:1]  # only full blocks
    assert block_hashes([1, 2, 3, 4], 4, root_hash("other-model")) != a[:1]


def test_full_computed_blocks_are_found_and_shared_by_a_later_prompt():
    bm = BlockManager(8, 4, ROOT)
    a = computed(bm, seq(range(1, 11)))                       # 2 full blocks + 2 tokens
    assert [bm.is_cached(b) for b in a.block_table] == [True, True, False]
    b = seq([*range(1, 9), 50, 51, 52])
    hit = bm.lookup(b)
    assert hit == a.block_table[:2]
    bm.acquire(hit)
    assert [bm.ref_counts[i] for i in hit] == [2, 2]
    assert bm.lookup(seq(range(1, 9))) == a.block_table[:1]   # the last token is always computed
    assert bm.lookup(seq([2, *range(2, 11)])) == []           # first block differs: nothing


def test_freed_cached_blocks_stay_findable_until_the_pool_needs_them_lru_first():
    bm = BlockManager(4, 2, ROOT)
    a = computed(bm, seq([1, 2, 3, 4]))
    bm.free(a.block_table)
    assert bm.num_free == 4 and len(bm.cached) == 2
    b = computed(bm, seq([5, 6]))
    bm.free(b.block_table)                                    # b's block is now the most recent
    assert bm.lookup(seq([1, 2, 3, 4, 9])) == a.block_table   # still there: unused blocks went first
    taken = bm.allocate(3)                                    # 1 uncached + 2 evictions: a's last block, then first
    assert a.block_table[1] in taken and a.block_table[0] in taken and b.block_table[0] not in taken
    assert bm.evictions == 2 and bm.lookup(seq([1, 2, 3, 4, 9])) == []
    assert bm.lookup(seq([5, 6, 9])) == b.block_table
    bm.free(taken)
    assert bm.num_free == 4 and not any(bm.ref_counts)


def test_a_block_whose_prefix_is_already_cached_elsewhere_stays_unregistered():
    bm = BlockManager(8, 2, ROOT)
    a = computed(bm, seq([1, 2, 3]))
    b = computed(bm, seq([1, 2, 3]))                          # computed twice concurrently
    assert bm.cached == {a.block_hashes[0]: a.block_table[0]} and not bm.is_cached(b.block_table[0])
    bm.free(a.block_table), bm.free(b.block_table)
    assert bm.num_free == 8


def test_acquiring_an_unregistered_free_block_raises():
    bm = BlockManager(2, 2, ROOT)
    with pytest.raises(ValueError):
        bm.acquire([0])


def run_scheduler(sched: Scheduler, live: list[Sequence], rng: random.Random, pending: list[Sequence]) -> int:
    """Step a fake model until every request ends, aborting some, asserting after every
    step that no block registered in the cache is written and tables own what they hold."""
    bm, bs = sched.blocks, sched.blocks.block_size
    preemptions = 0
    for _ in range(50_000):
        for _ in range(rng.randint(0, 2)):
            if pending:
                live.append(pending.pop())
                sched.add(live[-1])
        if rng.random() < 0.05:
            unfinished = [s for s in live if not s.is_finished]
            if unfinished:
                sched.finish(rng.choice(unfinished), "abort")
        batch = sched.schedule()
        preemptions += len(batch.preempted)
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            first, last = s.num_computed_tokens // bs, (s.num_computed_tokens + n - 1) // bs
            written = s.block_table[first:last + 1]
            assert not any(bm.is_cached(b) for b in written), "a cached block would be written"
        sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        sched.advance(batch)
        for s in sampled:
            s.append(FAKE_TOKEN)
            if len(s.output_token_ids) >= s.params.max_tokens:
                sched.finish(s, "length")
        refs = [0] * bm.num_blocks
        for s in sched.running:
            for b in s.block_table:
                refs[b] += 1
        assert refs == bm.ref_counts, "reference counts disagree with the block tables"
        assert bm.num_free == sum(r == 0 for r in refs)
        if not pending and not sched.has_work():
            return preemptions
    raise AssertionError("no progress")


@pytest.mark.parametrize("chunked,budget", [(True, 24), (False, 80)])
def test_random_shared_prefix_load_with_aborts_and_preemption_leaks_nothing(chunked, budget):
    rng = random.Random(99)
    sched = Scheduler(BlockManager(24, 4, ROOT), 8, budget, chunked)
    prefixes = [[rng.randrange(1, 300) for _ in range(rng.randint(4, 24))] for _ in range(4)]
    pending = [seq(rng.choice(prefixes) + [rng.randrange(1, 300) for _ in range(rng.randint(0, 12))],
                   rng.randint(1, 24)) for _ in range(200)]
    live: list[Sequence] = []
    preemptions = run_scheduler(sched, live, rng, pending)
    assert all(s.is_finished for s in live) and len(live) == 200
    assert preemptions > 0 and any(s.finish_reason == "abort" for s in live)
    assert sched.blocks.hit_tokens > 0 and sched.blocks.evictions > 0
    assert sched.blocks.num_free == 24 and not any(sched.blocks.ref_counts)


def test_a_cached_prefix_is_skipped_on_admission():
    sched = Scheduler(BlockManager(16, 4, ROOT), 4, 64, True)
    first = seq(range(1, 11), max_tokens=1)
    sched.add(first)
    batch = sched.schedule()
    sched.advance(batch)
    first.append(FAKE_TOKEN)
    sched.finish(first, "length")
    again = seq([*range(1, 11), 40, 41], max_tokens=1)
    sched.add(again)
    batch = sched.schedule()
    assert batch.num_new_tokens == [4] and again.num_cached_tokens == 8
    assert again.num_computed_tokens == 8 and again.num_registered_blocks == 2


# engine parity with transformers


def engine_cfg(path, **kw) -> EngineConfig:
    base = dict(model=path, kv_blocks=128, block_size=4, max_num_batched_tokens=32, max_num_seqs=6)
    return EngineConfig(**{**base, **kw})


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def check(ref, prompts, outs, n, what):
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert_matches_reference(o, ref.generate(p, n), f"{what} request {i}")


@pytest.mark.parametrize("tp", [1, 2])
def test_repeated_and_shared_prefix_prompts_match_transformers(tiny_models, reference, tp):
    path = tiny_models["qwen2"]
    rng = random.Random(5)
    system = [rng.randrange(384) for _ in range(22)]          # ends mid-block (block size 4)
    prompts = [system + [rng.randrange(384) for _ in range(rng.randint(1, 9))] for _ in range(6)]
    with LLMEngine(engine_cfg(path, tp=tp)) as engine:
        first = engine.generate(prompts[:1], greedy(8))       # warms the cache
        concurrent = engine.generate(prompts, greedy(8))      # shared prefix, running together
        repeated = engine.generate(prompts[:2], greedy(8))    # whole prompts again
        hits = engine.blocks.hit_tokens
        assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    assert hits >= 5 * 20 + 2 * 20, f"expected the shared prefix to be reused, {hits} tokens hit"
    ref = reference(path)
    check(ref, prompts[:1], [c.token_ids for c in first], 8, "first")
    check(ref, prompts, [c.token_ids for c in concurrent], 8, "concurrent")
    check(ref, prompts[:2], [c.token_ids for c in repeated], 8, "repeated")


def test_prefix_caching_off_reuses_nothing(tiny_models):
    with LLMEngine(engine_cfg(tiny_models["qwen2"], prefix_caching=False)) as engine:
        engine.generate([list(range(1, 20))] * 2, greedy(2))
        assert engine.blocks.hit_tokens == 0 and not engine.blocks.cached


def test_preemption_and_eviction_under_a_small_pool_match_transformers(tiny_models, reference):
    path = tiny_models["llama"]
    rng = random.Random(11)
    prefixes = [[rng.randrange(384) for _ in range(rng.randint(9, 18))] for _ in range(3)]
    prompts = [rng.choice(prefixes) + [rng.randrange(384) for _ in range(rng.randint(1, 6))] for _ in range(10)]
    with LLMEngine(engine_cfg(path, kv_blocks=24, max_num_batched_tokens=24, max_num_seqs=8)) as engine:
        seqs = []
        for i in range(0, len(prompts), 3):                   # waves: later ones meet cached, evicted prefixes
            seqs += [engine.add_request(p, greedy(16)) for p in prompts[i:i + 3]]
            for _ in range(4):
                engine.step()
        while engine.has_work():
            engine.step()
        assert sum(s.num_preemptions for s in seqs) > 0, "the pool was meant to force preemption"
        assert engine.blocks.evictions > 0 and engine.blocks.hit_tokens > 0
        assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    check(reference(path), prompts, [s.output_token_ids for s in seqs], 16, "small pool")
