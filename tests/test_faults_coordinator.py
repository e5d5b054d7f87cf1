"""Faults aimed at the coordinator: registrations cut short or lying, prompts too
large to tokenize on its loop, more requests than KV, clients that stop reading.
Real processes on loopback; faults come from raw clients. Every request ends in
tokens or a precise status, and KV returns to baseline."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from pdserve.cluster import free_port
from pdserve.common.model_files import compat_hash
from pdserve.wire.protocol import PROTOCOL_VERSION
from pdserve.v1 import api_pb2
from tests.cluster_util import Client, greedy, request, start_cluster
from tests.conftest import assert_matches_reference
from tests.fault_util import (StalledClient, model_info, register, run_all, start_coordinator, wait_until,
                              write_tiny_chat_model)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smol_dir):
    return write_tiny_chat_model(tmp_path_factory.mktemp("chat"), smol_dir)


def test_a_registration_cancelled_while_the_tokenizer_loads_leaves_no_half_state(chat_model):
    """The node's deadline fires while the coordinator loads the tokenizer: nothing is
    half set, and the next registration completes the load."""
    address = f"127.0.0.1:{free_port()}"
    coordinator = start_coordinator(address)
    client = Client(address)
    try:
        info = model_info(name=chat_model, vocab_size=49152)
        with pytest.raises(grpc.RpcError) as e:
            register(address, "127.0.0.1:1", info, timeout=0.005)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        half = client.status()
        assert half["model"] == "" or half["vocab_size"] == 49152, half  # nothing, or all of it
        register(address, "127.0.0.1:1", info)  # the retry: completes the load
        assert client.status()["vocab_size"] == 49152
        for req in (request("Hello there", greedy(4)), request([40000, 5], greedy(4))):
            with pytest.raises(grpc.RpcError) as e:
                client.generate(req, timeout=10)
            # tokenized and in range: it fails only for want of a live decode node
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    finally:
        client.close()
        coordinator.kill()
        coordinator.wait()


def test_a_wrong_first_registrant_does_not_fix_the_model_and_a_live_node_is_never_evicted(tiny_models, reference):
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, prefill=0, decode=0, colocated=1,
                            coordinator_flags=("--model", tiny_models["qwen2"]))
    client = Client(cluster.cfg.listen)
    try:
        with pytest.raises(grpc.RpcError) as e:  # --model: another checkpoint is refused outright
            register(cluster.cfg.listen, "127.0.0.1:1", model_info(name=tiny_models["qwen3"]))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        node = client.status()["nodes"][0]
        real = model_info(name=tiny_models["qwen2"], compat_hash=compat_hash(Path(tiny_models["qwen2"]), 2, 2, 16, 16,
                                                                             "float32", PROTOCOL_VERSION))
        with pytest.raises(grpc.RpcError) as e:  # an impostor at a live node's address
            register(cluster.cfg.listen, node["address"], real)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        status = client.status()
        assert [(n["id"], n["healthy"]) for n in status["nodes"]] == [(node["id"], True)]
        assert status["model"] == tiny_models["qwen2"]
        out = client.generate(request([3, 1, 4, 1, 5], greedy(8, ignore_eos=True)))
        assert_matches_reference(out["token_ids"], reference(tiny_models["qwen2"]).generate([3, 1, 4, 1, 5], 8),
                                 "after the impostors")
    finally:
        client.close()
        cluster.stop()

    # no --model: a first registrant that goes silent does not fix the model for later nodes
    address = f"127.0.0.1:{free_port()}"
    coordinator = start_coordinator(address)
    try:
        register(address, "127.0.0.1:1", model_info(name=tiny_models["qwen3"], compat_hash="other"))
        time.sleep(0.2)
        cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, prefill=0, decode=0, colocated=1,
                                listen=address, coordinator=False)
        client = Client(address)
        try:
            assert client.status()["model"] == tiny_models["qwen2"]
            out = client.generate(request([2, 7, 1, 8], greedy(6, ignore_eos=True)))
            assert len(out["token_ids"]) == 6
        finally:
            client.close()
            cluster.stop()
    finally:
        coordinator.kill()
        coordinator.wait()


def test_a_huge_text_prompt_is_refused_without_stalling_the_streams_beside_it(chat_model, reference):
    """A prompt over --max-request-bytes is refused before any work; one under it but
    over the context is tokenized off the event loop: heartbeats go on, no node is
    declared dead, the streams beside it finish intact."""
    cluster = start_cluster(model=chat_model, decode=2, kv_blocks=128,
                            coordinator_flags=("--max-request-bytes", str(3 << 20)))
    client = Client(cluster.cfg.listen)
    try:
        errors = {}

        def big(name, size):
            try:
                client.generate(request("hello world " * (size // 12), greedy(4)), timeout=120)
            except grpc.RpcError as e:
                errors[name] = e
        threads = [threading.Thread(target=big, args=a) for a in (("over", 10 << 20), ("under", 2 << 20))]
        for t in threads:
            t.start()
        jobs = [(list(range(10 + i, 30 + i)), 200) for i in range(4)]
        outs = run_all(client, jobs)
        for t in threads:
            t.join()
        assert errors["over"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, errors["over"].details()
        assert errors["under"].code() == grpc.StatusCode.INVALID_ARGUMENT, errors["under"].details()
        ref = reference(chat_model)
        for (prompt, n), out in zip(jobs, outs):
            assert isinstance(out, dict), f"a stream beside the huge prompt failed: {out}"
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "beside a huge prompt")
        assert sum(n["healthy"] for n in client.status()["nodes"]) == 3
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()


def test_more_requests_than_kv_queue_and_all_finish(tiny_models, reference):
    """60 requests against 32 decode blocks: they wait for blocks instead of failing."""
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=32)
    client = Client(cluster.cfg.listen)
    try:
        jobs = [([(7 * i + j) % 384 for j in range(20)], 40) for i in range(60)]
        outs = run_all(client, jobs, timeout=120)
        failed = [o for o in outs if not isinstance(o, dict)]
        assert not failed, f"{len(failed)} of 60 failed, e.g. {failed[0].code()}: {failed[0].details()}"
        ref = reference(tiny_models["qwen2"])
        for (prompt, n), out in zip(jobs, outs):
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "queued")
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()


def test_a_client_that_stops_reading_is_cut_off_and_frees_its_slot(tiny_models, tmp_path):
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, max_inflight=1, log_dir=str(tmp_path),
                            coordinator_flags=("--max-queued", "0", "--client-stall-timeout", "1.5"))
    client = Client(cluster.cfg.listen)
    stalled = StalledClient(cluster.cfg.listen, request(list(range(1, 20)), greedy(480, ignore_eos=True)))
    try:
        wait_until(lambda: stalled.received > 0, 30, "the first bytes of the stalled stream")
        wait_until(lambda: "read nothing" in (tmp_path / "0-coordinator.log").read_text(), 30, "the cut")
        assert stalled.received < 4096  # it was cut off, not served to the end
        out = client.generate(request([4, 5, 6], greedy(5, ignore_eos=True)))  # its slot is free again
        assert len(out["token_ids"]) == 5
        client.wait_blocks_at_baseline()
    finally:
        stalled.close()
        client.close()
        cluster.stop()


def test_a_client_that_lags_past_the_bound_ends_with_resource_exhausted_and_the_others_finish(tiny_models, reference,
                                                                                              tmp_path):
    """A stream that stops reading while its request generates: its tokens wait in the
    coordinator up to --max-pending-tokens, then the request is ended (RESOURCE_EXHAUSTED,
    seen once the client reads again) and its KV freed; streams beside it are untouched."""
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, log_dir=str(tmp_path),
                            coordinator_flags=("--max-pending-tokens", "24"))
    client = Client(cluster.cfg.listen)
    stalled = StalledClient(cluster.cfg.listen, request(list(range(1, 20)), greedy(400, ignore_eos=True)))
    try:
        wait_until(lambda: stalled.received > 0, 30, "the first bytes of the stalled stream")
        jobs = [([(5 * i + j) % 384 for j in range(12)], 40) for i in range(6)]
        outs = run_all(client, jobs)
        ref = reference(tiny_models["qwen2"])
        for (prompt, n), out in zip(jobs, outs):
            assert isinstance(out, dict), f"{out.code()}: {out.details()}"
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "beside a lagging client")
        wait_until(lambda: "24 tokens behind" in (tmp_path / "0-coordinator.log").read_text(), 30, "the cut")
        client.wait_blocks_at_baseline()  # its KV is freed while its client still reads nothing
        stalled.resume()
        wait_until(stalled.ended.is_set, 30, "the lagging stream to end")
        code, message = stalled.status()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "max-pending-tokens" in message
        tokens = [t for m in stalled.messages(api_pb2.GenerateResponse) for t in m.token_ids]
        assert 1 <= len(tokens) < 400  # ended, not generated to the end into the coordinator's memory
    finally:
        stalled.close()
        client.close()
        cluster.stop()
