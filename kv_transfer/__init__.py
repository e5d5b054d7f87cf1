"""KV data plane: moves a prompt's KV from prefill ranks to decode ranks. One node-side
contract (base/), one folder per backend; nodes pick a backend by --kv-transport name
through registry.py and never branch on it.

    base/       roles and the node-side contract (conn.py), transfer states (status.py), KV
                layout and head re-slicing (layout.py), the KV message and its checks
                (header.py), the control channel over ZeroMQ (inbox.py, outbox.py), the
                backend descriptor (backend.py)
    zmq/        ZeroMQ: data and control as ZeroMQ frames, any hosts
    nccl/       NCCL between GPUs (gloo on CPU): the engine's ranks move the data through
                its KV connector worker (nccl/connector.py), pairs opened at registration
    fake/       completes at once inside one process (node tests that test no transport)
    registry.py backend name -> its config, manager and connector

Importing this package (and the registry, and any backend's config.py) loads no torch."""
