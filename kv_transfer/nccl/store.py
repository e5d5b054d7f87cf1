"""The rendezvous store of the NCCL KV transport: a torch.distributed TCPStore whose
listening socket we bind ourselves, so it listens on the address asked for (127.0.0.1
by default) and not on every interface, and a client for it. Ranks of both nodes meet
there to build one 2-rank process group per (prefill rank, decode rank) pair; the
store carries only small keys (nonces, NCCL unique ids, gloo addresses), never pickles."""
from __future__ import annotations

import datetime
import socket

from torch.distributed import TCPStore


def serve_store(host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> tuple[TCPStore, int]:
    """A TCPStore server listening on (host, port) only; port 0 picks a free one.
    Returns the store (keep it alive: the server stops with it) and the bound port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        bound = sock.getsockname()[1]
        store = TCPStore(host, bound, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                         master_listen_fd=sock.fileno(), use_libuv=True)
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's event loop owns the descriptor now and closes it
    return store, bound


def connect_store(host: str, port: int, timeout_s: float) -> TCPStore:
    """A client of the store at (host, port); connecting and every blocking get wait up to timeout_s."""
    return TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
