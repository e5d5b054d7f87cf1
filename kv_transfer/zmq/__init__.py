"""The ZeroMQ KV transport: config.py (ZmqConfig), manager.py (ZmqKVManager, either role),
sender.py (ZmqKVSender), receiver.py (ZmqKVReceiver), connector.py (the engine-side worker
that streams a prompt's layers from its step), streams.py (how that worker finds the
node's senders), backend.py (what the registry hands out).
Its sockets and threads are the shared control channel of kv_transfer/base (inbox, outbox)."""
