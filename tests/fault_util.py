"""Fault injection for end-to-end tests: raw node registrations, a client that stops
reading, member processes picked by role, and a tiny model that has a tokenizer."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from pdserve.wire.protocol import PROTOCOL_VERSION
from pdserve.v1 import api_pb2, node_pb2, node_pb2_grpc  # noqa: F401
from tests.cluster_util import Client, greedy, request


def write_tiny_chat_model(path, tokenizer_dir: str, max_positions: int = 512) -> str:
    """A tiny random Llama with the default model's tokenizer (49152 ids): text and chat
    prompts at tiny-model speed."""
    import torch
    import transformers as tf
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def model_info(**kw) -> node_pb2.ModelInfo:
    base = dict(name="fake", num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="float32",
                vocab_size=384, max_model_len=512, compat_hash="fake-layout", checkpoint_hash="fake-weights")
    base.update(kw)
    return node_pb2.ModelInfo(**base)


def register(coordinator: str, address: str, model: node_pb2.ModelInfo, role=api_pb2.ROLE_DECODE,
             timeout: float = 30.0) -> node_pb2.RegisterResponse:
    """Register as a node would, from a raw client (no node behind the address)."""
    with grpc.insecure_channel(coordinator) as ch:
        return node_pb2_grpc.CoordinatorStub(ch).Register(node_pb2.RegisterRequest(
            protocol_version=PROTOCOL_VERSION, role=role, address=address, kv_endpoint="tcp://127.0.0.1:1", tp=1,
            model=model, kv_blocks_total=8), timeout=timeout)


def pids_by_role(cluster) -> dict[str, list[int]]:
    """Member pids by role (coordinator, prefill, decode, both), in start order."""
    out: dict[str, list[int]] = {}
    for p in cluster.procs:
        args = list(p.args)
        role = args[args.index("--role") + 1] if "--role" in args else "coordinator"
        out.setdefault(role, []).append(p.pid)
    return out


def run_all(client: Client, jobs, timeout: float = 60.0) -> list:
    """Greedy (prompt, max_tokens) jobs at once; each result is its output dict or its grpc.RpcError."""
    def one(job):
        try:
            return client.generate(request(job[0], greedy(job[1], ignore_eos=True)), timeout=timeout)
        except grpc.RpcError as e:
            return e
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def submit(client: Client, jobs, timeout: float = 60.0):
    """Start run_all in the background; .result() waits for it."""
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(run_all, client, jobs, timeout)
    pool.shutdown(wait=False)
    return fut


class Frozen:
    """SIGSTOP a process for the with-block (SIGCONT on the way out, whatever happens)."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def start_coordinator(listen: str, *flags: str) -> subprocess.Popen:
    """A coordinator process on its own (e.g. a restart on the address of a dead one)."""
    p = subprocess.Popen([sys.executable, "-m", "pdserve", "coordinator", "--listen", listen, "--workers", "1", *flags],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = p.stdout.readline()
    assert line.startswith("ready"), line
    return p


class StalledClient:
    """A server-streaming call (Generate by default) over raw HTTP/2 from a client that
    never reads: its stream's flow control window stays at `window` bytes, so the
    server's writes block."""

    def __init__(self, address: str, req, window: int = 256, path: str = "/pdserve.v1.Generation/Generate"):
        import h2.config
        import h2.connection
        import h2.settings
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        sid = self.sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                     (":path", path), (":authority", address),
                                     ("content-type", "application/grpc"), ("te", "trailers")])
        body = req.SerializeToString()
        self.conn.send_data(sid, b"\0" + struct.pack(">I", len(body)) + body, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.received = 0
        self.data = bytearray()
        self.ended = threading.Event()  # trailers or a reset came: the server ended the stream
        self.events: list = []
        self.lock = threading.Lock()  # the connection's state, shared with resume()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import h2.events
        import h2.exceptions
        while True:
            try:
                data = self.sock.recv(65536)
                with self.lock:
                    events = self.conn.receive_data(data) if data else []
            except (OSError, h2.exceptions.ProtocolError):  # reset, or frames after the server closed
                break
            if not data:
                break
            for ev in events:  # never acknowledged: the window never reopens
                self.events.append(ev)
                if isinstance(ev, h2.events.DataReceived):
                    self.received += len(ev.data)
                    self.data += ev.data
                if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.TrailersReceived)):
                    self.ended.set()
            with self.lock:
                out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)
        self.ended.set()

    def resume(self, window: int = 1 << 24) -> None:
        """Start reading: the windows open wide, so what the server holds back arrives."""
        with self.lock:
            self.conn.increment_flow_control_window(window)
            self.conn.increment_flow_control_window(window, stream_id=self.sid)
            out = self.conn.data_to_send()
        self.sock.sendall(out)

    def status(self) -> tuple[int | None, str]:
        """The call's grpc-status and message from its trailers (None: none came)."""
        import h2.events
        for ev in self.events:
            if isinstance(ev, h2.events.TrailersReceived):
                headers = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                           for k, v in ev.headers}
                return int(headers["grpc-status"]), headers.get("grpc-message", "")
        return None, ""

    def messages(self, cls) -> list:
        """The length-prefixed messages received so far, parsed as cls."""
        out, at, data = [], 0, bytes(self.data)
        while at + 5 <= len(data):
            n = struct.unpack(">I", data[at + 1:at + 5])[0]
            out.append(cls.FromString(data[at + 5:at + 5 + n]))
            at += 5 + n
        return out

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


def wait_until(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
