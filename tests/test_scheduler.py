import random

import pytest

from pdserve.engine.block_manager import BlockManager
from pdserve.common.sampling import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SeqStatus

FAKE_TOKEN = 7


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, chunked=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, chunked)


def req(prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def step(sched: Scheduler):
    """One engine step with a fake model: sample, advance, finish at max_tokens."""
    batch = sched.schedule()
    assert all(s.status == SeqStatus.RUNNING for s in batch.seqs)
    sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
    sched.advance(batch)
    for s in sampled:
        s.append(FAKE_TOKEN)
        if len(s.output_token_ids) >= s.params.max_tokens:
            sched.finish(s, "length")
    return batch, sampled


def run_until_idle(sched: Scheduler, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not sched.has_work():
            return
        step(sched)
    raise AssertionError("scheduler made no progress")


def assert_no_leaks(sched: Scheduler) -> None:
    assert sched.blocks.num_free == sched.blocks.num_blocks and not any(sched.blocks.ref_counts)


def test_requests_join_the_running_batch_mid_decode_and_leave_when_finished():
    sched = make()
    a = req(6, max_tokens=4)
    sched.add(a)
    step(sched)                                   # a: prefill
    step(sched)                                   # a: first decode
    b = req(5, max_tokens=4)
    sched.add(b)
    batch, sampled = step(sched)
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 5] and sampled == [a, b]
    step(sched)                                   # a's 4th token: a finishes
    assert a.is_finished and a.finish_reason == "length" and len(a.output_token_ids) == 4
    assert sched.running == [b] and a.block_table == []
    batch, _ = step(sched)
    assert batch.seqs == [b]
    run_until_idle(sched)
    assert len(b.output_token_ids) == 4
    assert_no_leaks(sched)


def test_long_prompt_is_split_into_budget_sized_chunks_and_samples_only_after_the_last():
    sched = make(budget=8, chunked=True)
    s = req(20, max_tokens=2)
    sched.add(s)
    chunks, sampled_at = [], []
    while not s.is_finished:
        batch, sampled = step(sched)
        chunks.append(batch.num_new_tokens[0])
        sampled_at.append(bool(sampled))
    assert chunks == [8, 8, 4, 1]
    assert sampled_at == [False, False, True, True]
    assert_no_leaks(sched)


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_whole_in_the_budget():
    sched = make(budget=8, chunked=False)
    a, c = req(3, max_tokens=3), req(3, max_tokens=3)
    sched.add(a), sched.add(c)
    step(sched)                                   # both prefilled (6 tokens)
    b, d = req(7, max_tokens=1), req(1, max_tokens=1)
    sched.add(b), sched.add(d)
    while not (a.is_finished and c.is_finished):
        batch, _ = step(sched)                    # 2 decodes leave 6 < 7
        assert batch.seqs == [a, c] and b.num_computed_tokens == 0
        assert d.status == SeqStatus.WAITING       # no one jumps the queue
    batch, _ = step(sched)
    assert batch.seqs == [b, d] and batch.num_new_tokens == [7, 1]
    run_until_idle(sched)
    assert_no_leaks(sched)


def test_decodes_are_scheduled_before_new_prompts():
    sched = make(budget=8, chunked=True)
    running = [req(2, max_tokens=5) for _ in range(3)]
    for s in running:
        sched.add(s)
    step(sched)
    new = req(20, max_tokens=1)
    sched.add(new)
    batch, _ = step(sched)
    assert batch.seqs == running + [new]
    assert batch.num_new_tokens == [1, 1, 1, 5]   # the prompt gets what the decodes leave
    run_until_idle(sched)
    assert_no_leaks(sched)


def test_max_num_seqs_caps_the_running_batch():
    sched = make(max_num_seqs=2)
    seqs = [req(3, max_tokens=3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        batch, _ = step(sched)
        assert len(sched.running) <= 2 and len(batch) <= 2
    assert all(len(s.output_token_ids) == 3 for s in seqs)
    assert_no_leaks(sched)


def test_newest_running_sequence_is_preempted_and_later_recomputed_with_its_outputs():
    sched = make(num_blocks=6, block_size=4, budget=16, max_num_seqs=3)
    a, b, c, d = (req(4, max_tokens=8) for _ in range(4))   # 12 tokens = 3 blocks each
    for s in (a, b, c, d):
        sched.add(s)                              # d waits for a batch slot
    batch, _ = step(sched)
    while not batch.preempted:
        batch, _ = step(sched)
    assert batch.preempted == [c] and batch.seqs == [a, b]
    assert c.block_table == [] and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert c.status == SeqStatus.WAITING and list(sched.waiting) == [c, d]
    generated = len(c.output_token_ids)
    assert generated > 0
    while c.num_computed_tokens == 0:
        batch, sampled = step(sched)
    assert batch.num_new_tokens[batch.seqs.index(c)] == 4 + generated and c in sampled
    run_until_idle(sched)
    assert all(s.finish_reason == "length" and s.output_token_ids == [FAKE_TOKEN] * 8 for s in (a, b, c, d))
    assert_no_leaks(sched)


def test_sequence_added_running_with_its_kv_present_decodes_immediately():
    sched = make(block_size=4)
    s = req(8, max_tokens=3)
    s.block_table = sched.blocks.allocate(sched.blocks.blocks_for(8))
    s.num_computed_tokens = 8
    s.append(FAKE_TOKEN)                          # first token sampled by the prefill node
    sched.add(req(5, max_tokens=1))
    sched.add_running(s)
    batch, sampled = step(sched)
    assert batch.seqs[0] is s and batch.num_new_tokens[0] == 1 and s in sampled
    run_until_idle(sched)
    assert len(s.output_token_ids) == 3
    assert_no_leaks(sched)


def test_finish_frees_blocks_of_waiting_and_running_sequences_and_twice_is_harmless():
    sched = make(budget=4, max_num_seqs=1, chunked=True)
    running, waiting = req(10), req(3)
    sched.add(running), sched.add(waiting)
    step(sched)                                   # running is mid-prefill and holds blocks
    assert running.block_table and running.status == SeqStatus.RUNNING
    assert waiting.status == SeqStatus.WAITING
    for s in (running, waiting):
        sched.finish(s, "abort")
        sched.finish(s, "length")                 # a second finish changes nothing
    assert running.finish_reason == waiting.finish_reason == "abort"
    assert not sched.has_work() and running.block_table == []
    assert_no_leaks(sched)


@pytest.mark.parametrize("chunked,budget", [(True, 32), (False, 80)])
def test_random_load_with_preemptions_and_aborts_finishes_every_request_once(chunked, budget):
    rng = random.Random(1234)
    sched = make(num_blocks=24, block_size=4, max_num_seqs=8, budget=budget, chunked=chunked)
    pending = [req(rng.randint(1, 40), rng.randint(1, 30)) for _ in range(200)]
    live: list[Sequence] = []
    preemptions = 0
    for _ in range(20_000):
        for _ in range(rng.randint(0, 2)):
            if pending:
                live.append(pending.pop())
                sched.add(live[-1])
        if rng.random() < 0.05:
            unfinished = [s for s in live if not s.is_finished]
            if unfinished:
                sched.finish(rng.choice(unfinished), "abort")
        batch, _ = step(sched)                    # step() asserts no finished seq is scheduled
        preemptions += len(batch.preempted)
        assert not any(s.is_finished for s in [*sched.running, *sched.waiting])
        assert sum(batch.num_new_tokens) <= budget and len(sched.running) <= 8
        tables = [b for s in sched.running for b in s.block_table]
        assert len(tables) == len(set(tables)) == sched.blocks.num_blocks - sched.blocks.num_free
        if not pending and not sched.has_work():
            break
    assert len(live) == 200 and all(s.is_finished for s in live)
    for s in live:
        if s.finish_reason == "length":
            assert len(s.output_token_ids) == s.params.max_tokens
        else:
            assert s.finish_reason == "abort" and len(s.output_token_ids) < s.params.max_tokens
    assert preemptions > 0 and any(s.finish_reason == "abort" for s in live)
    assert_no_leaks(sched)
