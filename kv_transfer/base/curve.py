"""CURVE on the ZeroMQ KV sockets (encryption and authentication of the data plane).

Each node of a secured cluster makes a keypair at start and registers its public key
with the coordinator over the authenticated control plane; the coordinator lists it in
the peer lists, and a decode node puts it in each ticket. A decode node's ROUTER is a
CURVE server that admits (through ZAP) only the keys of the prefill peers the
coordinator listed; a prefill node's DEALER checks the decode node's key from the ticket.
A connection with any other key fails in the handshake: nothing reaches the inbox."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveKeys:
    public: bytes   # z85, 40 bytes
    secret: bytes

    @classmethod
    def generate(cls) -> "CurveKeys":
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support")
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def serve(self, sock: zmq.Socket) -> None:
        """Make sock a CURVE server with these keys (before bind)."""
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = self.secret, self.public, True

    def connect_to(self, sock: zmq.Socket, server_key: bytes) -> None:
        """Make sock a CURVE client of the server with server_key (before connect)."""
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = self.secret, self.public, server_key


class KeyGate:
    """The ZAP handler of a CURVE server: admits the public keys set with allow()."""

    def __init__(self, ctx: zmq.Context):
        self._allowed: frozenset[bytes] = frozenset()
        self._lock = threading.Lock()
        self.refused = 0   # handshakes refused (tests read it)
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))

    def start(self) -> None:
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)

    def stop(self) -> None:
        self._auth.stop()

    def allow(self, keys: set[bytes]) -> None:
        with self._lock:
            if keys != self._allowed:
                self._allowed = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: a client key asks to connect."""
        with self._lock:
            ok = key in self._allowed   # z85, as pyzmq passes it
        if not ok:
            self.refused += 1
            log.warning("KV connection refused: CURVE key %s... is no listed prefill peer's", key[:8].decode())
        return ok
