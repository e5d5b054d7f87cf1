"""Failure paths on the nodes, against real node processes (tiny qwen2 on CPU) and a
fake coordinator in this process that hands out epochs and reads the heartbeats:
epoch fencing, lease renewal, reservations that must not strand blocks, admission
headroom, orphan cleanup when a subscription ends, and a prefill that waits for its
acknowledgement past the lease."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
import zmq

from pdserve.v1 import api_pb2, kv_pb2, node_pb2, node_pb2_grpc

KV_BLOCKS = 32   # of 16 tokens


class FakeCoordinator(node_pb2_grpc.CoordinatorServicer):
    """Registers nodes under growing epochs and keeps their last heartbeat. forget(address)
    answers the node's next heartbeat with known=False; refusals = n refuses the next n
    registrations with ALREADY_EXISTS."""

    def __init__(self):
        self.lock = threading.Condition()
        self.nodes: dict[str, dict] = {}   # address -> node_id, epoch, role, kv_endpoint, free, beats
        self.next_epoch = int(time.time() * 1000)
        self.refusals = 0

    def Register(self, req, context):
        with self.lock:
            if self.refusals:
                self.refusals -= 1
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"a live node is registered at {req.address}")
            self.next_epoch += 1
            self.nodes[req.address] = dict(node_id=f"n{self.next_epoch}", epoch=self.next_epoch, role=req.role,
                                           kv_endpoint=req.kv_endpoint, free=None, beats=0, known=True)
            self.lock.notify_all()
            node = self.nodes[req.address]
        return node_pb2.RegisterResponse(node_id=node["node_id"], epoch=node["epoch"], heartbeat_interval_s=0.1)

    def Heartbeat(self, req, context):
        with self.lock:
            node = next((n for n in self.nodes.values() if n["node_id"] == req.node_id), None)
            if node is None or node["epoch"] != req.epoch or not node["known"]:
                return node_pb2.HeartbeatResponse(known=False)
            node["free"], node["beats"] = req.kv_blocks_free, node["beats"] + 1
            self.lock.notify_all()
        return node_pb2.HeartbeatResponse(known=True)

    def forget(self, address: str) -> None:
        with self.lock:
            self.nodes[address]["known"] = False

    def wait(self, predicate, timeout: float = 10.0, what: str = ""):
        with self.lock:
            assert self.lock.wait_for(predicate, timeout), f"timed out waiting for {what}"

    def node(self, role: int) -> tuple[str, dict]:
        with self.lock:
            return next((a, dict(n)) for a, n in self.nodes.items() if n["role"] == role)


@pytest.fixture(scope="module")
def nodes(tiny_models, tmp_path_factory):
    """One decode and one prefill node registered with a fake coordinator."""
    fake = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    node_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    logs = tmp_path_factory.mktemp("node-logs")
    procs = []
    for role in ("decode", "prefill"):
        cmd = [sys.executable, "-m", "pdserve", "node", "--role", role, "--coordinator", address,
               "--model", tiny_models["qwen2"], "--device", "cpu", "--kv-blocks", str(KV_BLOCKS)]
        with open(logs / f"{role}.log", "wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
    try:
        fake.wait(lambda: sum(n["beats"] > 0 for n in fake.nodes.values()) == 2, 120, "both nodes to heartbeat")
        channels = {role: grpc.insecure_channel(fake.node(role)[0]) for role in (api_pb2.ROLE_DECODE,
                                                                                 api_pb2.ROLE_PREFILL)}
        yield Nodes(fake, channels)
        for ch in channels.values():
            ch.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        server.stop(0)


class Nodes:
    def __init__(self, fake: FakeCoordinator, channels: dict):
        self.fake = fake
        self.decode = node_pb2_grpc.DecodeNodeStub(channels[api_pb2.ROLE_DECODE])
        self.prefill = node_pb2_grpc.PrefillNodeStub(channels[api_pb2.ROLE_PREFILL])

    @property
    def epoch(self) -> int:
        return self.fake.node(api_pb2.ROLE_DECODE)[1]["epoch"]

    def reserve(self, request_id: str, n: int, max_tokens: int = 8, lease_s: float = 30.0, epoch: int = 0,
                timeout: float = 10.0, subscriber: str = "") -> node_pb2.Ticket:
        return self.decode.Reserve(node_pb2.ReserveRequest(
            request_id=request_id, prompt_token_ids=[(7 * i) % 300 + 1 for i in range(n)],
            sampling=api_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0), lease_s=lease_s,
            epoch=epoch, subscriber=subscriber), timeout=timeout)

    def free_blocks(self) -> int:
        """The decode node's free blocks as of a heartbeat sent after this call."""
        address, node = self.fake.node(api_pb2.ROLE_DECODE)
        self.fake.wait(lambda: self.fake.nodes[address]["beats"] >= node["beats"] + 2, what="a heartbeat")
        return self.fake.node(api_pb2.ROLE_DECODE)[1]["free"]

    def wait_free(self, expected: int = KV_BLOCKS, timeout: float = 5.0) -> None:
        address = self.fake.node(api_pb2.ROLE_DECODE)[0]
        self.fake.wait(lambda: self.fake.nodes[address]["free"] == expected, timeout,
                       f"{expected} free blocks (now {self.fake.nodes[address]['free']})")


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_a_reserve_under_a_stale_epoch_is_refused(nodes):
    epoch = nodes.epoch
    with pytest.raises(grpc.RpcError) as e:
        nodes.reserve("stale-1", 20, epoch=epoch - 1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch" in e.value.details()
    assert nodes.reserve("stale-2", 20, epoch=epoch).epoch == epoch
    nodes.decode.Abort(node_pb2.AbortRequest(request_id="stale-2"))
    nodes.wait_free()


def test_renewals_keep_a_reservation_past_its_lease_and_unknown_ids_come_back_missing(nodes):
    kept, let_go = nodes.reserve("renew-kept", 40, lease_s=1.0), nodes.reserve("renew-gone", 40, lease_s=1.0)
    assert len(kept.block_ids) == len(let_go.block_ids) == 3
    started = time.time()
    for _ in range(3):  # ~2.5 s, each renewal 1 s long
        time.sleep(0.7)
        resp = nodes.decode.Renew(node_pb2.RenewRequest(epoch=nodes.epoch, request_ids=["renew-kept"], lease_s=1.0))
        assert list(resp.missing) == [] and resp.lease_expiry > time.time() + 0.5
    assert time.time() - started > 2.0
    resp = nodes.decode.Renew(node_pb2.RenewRequest(epoch=nodes.epoch,
                                                    request_ids=["renew-kept", "renew-gone", "never-here"]))
    assert sorted(resp.missing) == ["never-here", "renew-gone"]  # the one not renewed expired
    assert nodes.free_blocks() == KV_BLOCKS - 3
    assert code_of(lambda: nodes.decode.Renew(node_pb2.RenewRequest(
        epoch=nodes.epoch - 1, request_ids=["renew-kept"]))) == grpc.StatusCode.FAILED_PRECONDITION
    assert nodes.decode.Abort(node_pb2.AbortRequest(request_id="renew-kept")).found
    nodes.wait_free()


def test_reserves_cut_short_leave_no_blocks_behind(nodes):
    """Calls ended early at swept moments, by their deadline or by a cancel (a coordinator
    gone), each followed by the Abort a coordinator sends when a Reserve's outcome is unknown."""
    outcomes = []
    for i in range(120):
        rid, delay = f"hasty-{i}", 0.00003 * (i // 2 % 40)  # 0 to 1.2 ms
        req = node_pb2.ReserveRequest(request_id=rid, prompt_token_ids=list(range(1, 300)), lease_s=30.0,
                                      sampling=api_pb2.SamplingParams(max_tokens=8, temperature=0.0))
        call = nodes.decode.Reserve.future(req, timeout=delay + 0.0001 if i % 2 else 10.0)
        if not i % 2:
            until = time.perf_counter() + delay
            while time.perf_counter() < until:
                pass
            call.cancel()
        try:  # 19 blocks each: a stranded one is plain in the count
            call.result()
            outcomes.append("OK")
        except grpc.FutureCancelledError:
            outcomes.append("CANCELLED")
        except grpc.RpcError as e:
            outcomes.append(e.code().name)
        nodes.decode.Abort(node_pb2.AbortRequest(request_id=rid))
    assert {"CANCELLED", "DEADLINE_EXCEEDED"} <= set(outcomes)
    nodes.wait_free(timeout=3.0)  # well inside the 30 s lease


def test_an_abort_that_overtakes_its_reserve_refuses_the_reserve(nodes):
    assert not nodes.decode.Abort(node_pb2.AbortRequest(request_id="overtaken")).found
    assert code_of(lambda: nodes.reserve("overtaken", 20)) == grpc.StatusCode.ABORTED
    nodes.wait_free()


def test_a_reservation_that_would_leave_no_room_to_grow_is_refused(nodes):
    small = [f"small-{i}" for i in range(4)]
    for rid in small:  # one block each, and room to grow by one
        assert len(nodes.reserve(rid, 10).block_ids) == 1
    with pytest.raises(grpc.RpcError) as e:  # 25 of the 28 free blocks would leave 3 for 5 to grow
        nodes.reserve("greedy", 400, max_tokens=16)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "decode node full" in e.value.details()
    assert len(nodes.reserve("modest", 352, max_tokens=16).block_ids) == 22  # leaves 6 for 5
    for rid in small + ["modest"]:
        assert nodes.decode.Abort(node_pb2.AbortRequest(request_id=rid)).found
    nodes.wait_free()


def test_when_the_last_subscription_of_an_epoch_ends_its_requests_are_freed(nodes):
    first = nodes.decode.Subscribe(node_pb2.SubscribeRequest(epoch=nodes.epoch))
    assert next(first) == node_pb2.TokenBatch()  # live
    nodes.reserve("orphan-1", 40)
    nodes.reserve("orphan-2", 40)
    second = nodes.decode.Subscribe(node_pb2.SubscribeRequest())  # 0: the current epoch
    assert next(second) == node_pb2.TokenBatch()
    first.cancel()
    time.sleep(0.3)
    renew = node_pb2.RenewRequest(epoch=nodes.epoch, request_ids=["orphan-1", "orphan-2"])
    assert list(nodes.decode.Renew(renew).missing) == []  # the second subscriber still listens
    second.cancel()
    deadline = time.monotonic() + 3
    while len(nodes.decode.Renew(renew).missing) < 2:
        assert time.monotonic() < deadline, "the orphaned reservations were never aborted"
        time.sleep(0.05)
    nodes.wait_free()


def test_a_subscribers_requests_stream_to_it_alone_and_end_with_its_last_stream(nodes):
    """Coordinator workers subscribe under their own ids: a request reserved for one
    streams to that id's Subscribe calls only, and is freed when the last of them ends."""
    def subscribe(who):
        stream = nodes.decode.Subscribe(node_pb2.SubscribeRequest(subscriber=who), timeout=30)
        assert next(stream) == node_pb2.TokenBatch()  # live
        return stream
    a1, a2, b = subscribe("A"), subscribe("A"), subscribe("B")
    renew = node_pb2.RenewRequest(epoch=nodes.epoch, request_ids=["a-held", "b-held"])
    try:
        nodes.reserve("a-lapses", 40, lease_s=0.3, subscriber="A")
        nodes.reserve("a-held", 40, subscriber="A")
        nodes.reserve("b-held", 40, subscriber="B")
        for stream in (a1, a2):  # the lapsed lease fails the request on A's streams
            failed = next(stream).events
            assert [e.request_id for e in failed] == ["a-lapses"] and failed[0].error
        nodes.reserve("b-lapses", 40, lease_s=0.3, subscriber="B")
        assert [e.request_id for e in next(b).events] == ["b-lapses"]  # and B never saw A's
        a1.cancel()
        time.sleep(0.3)
        assert list(nodes.decode.Renew(renew).missing) == []  # A still has a stream
        a2.cancel()
        deadline = time.monotonic() + 3
        while list(nodes.decode.Renew(renew).missing) != ["a-held"]:
            assert time.monotonic() < deadline, "A's reservation outlived A's last stream"
            time.sleep(0.05)
        assert nodes.decode.Abort(node_pb2.AbortRequest(request_id="b-held")).found
    finally:
        for stream in (a1, a2, b):
            stream.cancel()
    nodes.wait_free()


def test_registering_anew_frees_what_the_old_epoch_held_and_fences_it_off(nodes):
    old = nodes.epoch
    nodes.reserve("old-epoch", 40, epoch=old)
    address = nodes.fake.node(api_pb2.ROLE_DECODE)[0]
    with nodes.fake.lock:
        nodes.fake.refusals = 2  # the coordinator still holds the old entry for a while
    nodes.fake.forget(address)
    nodes.fake.wait(lambda: nodes.fake.nodes[address]["epoch"] != old and nodes.fake.nodes[address]["beats"] > 0,
                    what="the node to register again")
    new = nodes.epoch
    assert code_of(lambda: nodes.reserve("old-again", 40, epoch=old)) == grpc.StatusCode.FAILED_PRECONDITION
    assert list(nodes.decode.Renew(node_pb2.RenewRequest(epoch=new, request_ids=["old-epoch"])).missing) == [
        "old-epoch"]
    nodes.wait_free()


def test_a_prefill_waits_for_its_acknowledgement_past_the_lease_within_its_deadline(nodes):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    acked = []

    def late_decode_node():  # takes every layer, then answers after the lease is over
        while True:
            parts = router.recv_multipart()
            header = kv_pb2.KVHeader.FromString(parts[1])
            if header.last:
                time.sleep(max(0.0, ticket.lease_expiry + 0.3 - time.time()))
                router.send_multipart([parts[0], kv_pb2.KVAck(transfer_id=header.transfer_id, ok=True)
                                       .SerializeToString()])
                acked.append(time.time())
                return
    ticket = node_pb2.Ticket(transfer_id="t-late", decode_node_id="fake", epoch=1, kv_endpoint=endpoint,
                             lease_expiry=time.time() + 0.5, block_ids=[0, 1])
    peer = threading.Thread(target=late_decode_node, daemon=True)
    peer.start()
    try:
        resp = nodes.prefill.Prefill(node_pb2.PrefillRequest(
            request_id="late-ack", prompt_token_ids=list(range(1, 20)),
            sampling=api_pb2.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), ticket=ticket),
            timeout=10)
        peer.join(5)
        assert acked and resp.transfer_end >= acked[0] > ticket.lease_expiry
    finally:
        router.close(linger=0)
        ctx.term()
