"""What every KV transport shares: roles and the node-side contract (conn.py), transfer
states (status.py), the KV layout and head re-slicing (layout.py), the KV message and
its checks (header.py), the control channel over ZeroMQ (inbox.py decode side,
outbox.py prefill side), and the backend descriptor the registry hands out (backend.py)."""
