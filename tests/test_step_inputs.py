"""The one-buffer step inputs of the CUDA path (engine/step_inputs.py), on CPU: every
array of a StepPlan lands where its view reads it, padded rows write nowhere and
padded tiles do nothing, a buffer is reused only once its copy is done, and the
prefill attention kernel that reads the tile list runs in Triton's interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pdserve.engine.model_runner import StepPlan
from pdserve.engine.step_inputs import BLOCK_M, DeviceInputs, Layout, max_tiles, tile_work, views


def mixed_plan() -> StepPlan:
    """Three sequences: a 70-token prompt, a decode, a 40-token chunk after a 20-token prefix."""
    g = torch.Generator().manual_seed(0)
    qlens, clens = [70, 1, 40], [70, 33, 60]
    tables = torch.randint(0, 1000, (3, 5), generator=g)
    pos = torch.cat([torch.arange(c - q, c) for q, c in zip(qlens, clens)])
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(qlens))
    slots = tables[rows, pos // 16] * 16 + pos % 16
    ids = torch.randint(0, 50_000, (sum(qlens),), generator=g)
    return StepPlan(ids, pos, slots, torch.tensor(qlens), torch.tensor(clens), tables, torch.tensor([69, 70, 110]))


def test_eager_inputs_are_the_plan():
    plan = mixed_plan()
    ids, positions, meta, sample = DeviceInputs(torch.device("cpu")).eager(plan)
    assert torch.equal(ids, plan.input_ids) and torch.equal(positions, plan.positions)
    assert torch.equal(meta.slot_mapping, plan.slot_mapping) and torch.equal(sample, plan.sample_tokens)
    assert torch.equal(meta.block_tables, plan.block_tables.int())
    assert meta.table_width.tolist() == [5] and torch.equal(meta.tables, plan.block_tables.flatten().int())
    assert meta.query_starts.tolist() == [0, 70, 71] and meta.query_lens_dev.tolist() == [70, 1, 40]
    assert meta.context_lens.tolist() == [70, 33, 60] and meta.max_query_len == 70 and meta.block_m == BLOCK_M
    work = meta.work.numpy()
    n = len(tile_work(np.array([70, 1, 40]), BLOCK_M))
    assert (work[:n] >= 0).all() and (work[n:] == -1).all() and work.size <= max_tiles(111, 3)  # padding at the tail
    seq, tile = work[:n] >> 16, work[:n] & 0xFFFF
    assert list(seq) == sorted(seq)  # sequence by sequence
    for s, q in enumerate([70, 1, 40]):  # each sequence's query rows in exactly one tile each
        assert list(tile[seq == s]) == list(range(-(-q // BLOCK_M)))


def test_padded_layout_pads_tokens_tiles_and_sample_rows():
    """As a prefill graph's buffer: capacities above the step, the rows up to the bucket
    padded (token 0, position 0, slot -1) and tiles past the step's marked -1."""
    plan = mixed_plan()
    layout = Layout(tokens=512, seqs=8, tiles=max_tiles(512, 8), table=8 * 40)
    dst = torch.full((layout.words,), 7, dtype=torch.int32)
    bucket = 128
    DeviceInputs(torch.device("cpu")).load(plan, layout, BLOCK_M, dst=dst, tokens=bucket,
                                           tiles=max_tiles(bucket, 8))
    d = views(dst, layout)
    t = plan.input_ids.numel()
    assert torch.equal(d["ids"][:t], plan.input_ids) and d["ids"][t:bucket].eq(0).all()
    assert d["positions"][t:bucket].eq(0).all() and d["slots"][t:bucket].eq(-1).all()
    assert d["sample"].tolist() == [69, 70, 110, 0, 0, 0, 0, 0]
    work = d["work"][:max_tiles(bucket, 8)]
    n_tiles = len(tile_work(np.array([70, 1, 40]), BLOCK_M))
    assert work[n_tiles:].eq(-1).all() and work[:n_tiles].ge(0).all()
    assert torch.equal(d["table"][:15], plan.block_tables.flatten().int())
    assert d["table"][15:].eq(7).all()  # past the step's table: not copied


def test_staging_alternates_buffers():
    from pdserve.engine.step_inputs import Staging
    s = Staging()
    a, buf_a, _ = s.take(10)
    b, buf_b, _ = s.take(20)
    assert a != b and buf_a.numel() >= 10 and buf_b.numel() >= 20
    assert s.take(5)[0] == a


def test_prefill_kernel_runs_the_tile_list_in_triton_interpreter():
    """tests/gpu/test_gpu_kernels.py's prefill tests (tiles with -1 padding, several
    sequences with prefixes, the table width read from memory), on CPU through Triton's
    interpreter: the kernel's indexing is checked in CI too."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                          "paged_prefill_tiles or tile_work", "tests/gpu/test_gpu_kernels.py"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "3 passed" in run.stdout, run.stdout[-3000:]


def test_tile_list_refuses_what_its_entries_cannot_name():
    with pytest.raises(ValueError, match="tile list"):
        tile_work(np.array([64 * (1 << 16) + 1]), 64)
    with pytest.raises(ValueError, match="tile list"):
        tile_work(np.ones((1 << 15) + 1, dtype=np.int64), 64)
    assert len(tile_work(np.array([64 << 16]), 64)) == 1 << 16
