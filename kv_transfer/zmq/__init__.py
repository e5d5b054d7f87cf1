"""The ZeroMQ KV transport: config.py (ZmqConfig), manager.py (ZmqKVManager, either role),
sender.py (ZmqKVSender), receiver.py (ZmqKVReceiver), backend.py (what the registry hands out).
Its sockets and threads are the shared control channel of kv_transfer/base (inbox, outbox)."""
