"""Colocated node (`--role both`): prefill and decode of a request in one engine,
one continuous batch with chunked prefill, no KV transfer. It is the baseline that
disaggregated goodput is measured against.

It speaks both node APIs to the coordinator: Reserve only validates (the engine
allocates blocks as it schedules), Prefill admits the request and answers with its
first token (decode_node/local_prefill.py), and the later tokens go out on the same
per-step token stream as a decode node's."""
from __future__ import annotations

import grpc

from pdserve.decode_node.server import DecodeNode
from pdserve.wire.protocol import to_engine_params
from pdserve.wire.rpc import RpcError
from pdserve.v1 import api_pb2, node_pb2


class ColocatedNode(DecodeNode):
    role = api_pb2.ROLE_BOTH
    service_name = "pdserve.v1.DecodeNode"

    async def Reserve(self, req: node_pb2.ReserveRequest, context) -> node_pb2.Ticket:
        prompt, params = list(req.prompt_token_ids), to_engine_params(req.sampling)
        epoch = self._epoch(req.epoch)
        if self.aborted.discard(req.request_id):
            raise RpcError(grpc.StatusCode.ABORTED, f"request {req.request_id} was aborted")
        await self.call(lambda engine: engine.validate(prompt, params))
        return node_pb2.Ticket(decode_node_id=self.agent.node_id, epoch=epoch,
                               lease_expiry=self._lease_expiry(req.lease_s), decode_tp=self.cfg.engine.tp)

    async def Renew(self, req: node_pb2.RenewRequest, context) -> node_pb2.RenewResponse:
        self._epoch(req.epoch)  # Reserve holds nothing here: there is no lease to extend
        return node_pb2.RenewResponse(lease_expiry=self._lease_expiry(req.lease_s))
