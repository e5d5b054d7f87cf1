"""Node logic with the fake KV backend (kv_transfer/fake): a coordinator, a prefill node and
a decode node in this one process, the KV copied straight from one engine to the other.
The nodes run no transport of their own here; the outputs still equal transformers', and
every block comes back, also for a request that ends at its first token."""
from __future__ import annotations

import asyncio
import time

from pdserve.cluster import free_port
from pdserve.coordinator.server import Coordinator, CoordinatorConfig
from pdserve.decode_node.server import DecodeNode
from pdserve.common.config import EngineConfig
from pdserve.common.config import NodeConfig
from pdserve.prefill_node.server import PrefillNode
from tests.cluster_util import Client, greedy, request
from tests.conftest import assert_matches_reference
from tests.test_cluster import workload


async def run_in_process_cluster(model: str, client_work) -> object:
    """Start the three members on one event loop, run client_work(client) in a thread, stop them."""
    coord = Coordinator(CoordinatorConfig(listen=f"127.0.0.1:{free_port()}", model=model, heartbeat_interval_s=0.2))
    address = await coord.start()
    nodes = []
    try:
        for node in (DecodeNode, PrefillNode):
            nodes.append(node(NodeConfig(address, kv_transport="fake",
                                         engine=EngineConfig(model=model, kv_blocks=64, block_size=4))))
            await nodes[-1].start()
        client = Client(address)
        try:
            return await asyncio.to_thread(client_work, client)
        finally:
            client.close()
    finally:
        for node in reversed(nodes):
            await node.close()
        await coord.close()


def test_a_cluster_on_the_fake_backend_serves_like_the_reference_and_frees_every_block(tiny_models, reference):
    model = tiny_models["qwen2"]
    jobs = workload(5, 6)

    def work(client: Client):
        deadline = time.monotonic() + 60
        while sum(n["healthy"] for n in client.status()["nodes"]) < 2:
            assert time.monotonic() < deadline, "the nodes did not come up"
            time.sleep(0.1)
        outs = client.generate_all(jobs)
        first_only = client.generate(request([3, 1, 4, 1, 5], greedy(1, ignore_eos=True)))
        client.wait_blocks_at_baseline()
        return outs, first_only

    outs, first_only = asyncio.run(run_in_process_cluster(model, work))
    ref = reference(model)
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "fake KV backend")
    assert len(first_only["token_ids"]) == 1
