"""Coordinator: the gRPC front door. Keeps the node registry (register, heartbeats,
health), routes each request to a decode node (reserve blocks) and a prefill node
(prefill + KV shipping), relays the decode nodes' batched token streams to the
clients, and owns every request's lifecycle:

    QUEUED -> RESERVED -> PREFILLING -> TRANSFERRING -> DECODING -> FINISHED | CANCELLED | FAILED"""
