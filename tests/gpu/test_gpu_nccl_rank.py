"""RankKV over NCCL between two GPUs (skipped without two): the CPU tests' scenarios with
the prefill ranks on GPU 0 and the decode ranks on GPU 1, in bfloat16, the sender's cache
filled layer by layer behind a delay, each layer reported queued as the forward's hook
does, the sends queued from those reports (a gather that did not wait for its layers
would send zeros and fail the comparison; two transfers of one forward share a pair), and a
dead or silent peer ended by the timeout and its abort, then the pair rebuilt.

Run on a GPU host: PYTHONPATH=. python -m pytest -q tests/gpu/test_gpu_nccl_rank.py"""
from __future__ import annotations

import pytest
import torch

from tests.test_nccl_rank import Setup, dead_or_silent, one_to_one, peers, resharding, store  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 GPUs")

GPU = Setup(dtype="bfloat16", prefill_device="cuda:0", decode_device="cuda:1", forward=True, sees_death=False)


def test_nccl_one_to_one_with_layer_events(store, peers, tmp_path):  # noqa: F811
    one_to_one(GPU, store, peers, tmp_path)


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1)])
def test_nccl_tp_resharding(store, peers, tmp_path, prefill_tp, decode_tp):  # noqa: F811
    resharding(GPU, store, peers, tmp_path, prefill_tp, decode_tp)


def test_nccl_dead_or_silent_peer_and_rebuilt_pair(store, peers, tmp_path):  # noqa: F811
    dead_or_silent(GPU, store, peers, tmp_path)
