"""Runs the model on all TP ranks. Rank 0 lives in this process; ranks 1..N-1 are
child processes (engine.worker) that receive each step's plan by broadcast.

Commands are int64 tensors, never pickled objects: a 5-number header
[command, *args] followed by an int64 body (the packed plan for RUN, block ids for
EXPORT of KV, the writes of an IMPORT batch, whose tensors then move by gather/scatter,
the keys of KV_POLL).
KV connector metadata (KV_APPLY now, KV_STEP with the next RUN) goes as the bytes of
its typed codec (engine/kv_connector.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pdserve.engine import parallel
from pdserve.common.config import EngineConfig
from pdserve.engine.kv_connector import KVConnectorMetadata, KVConnectorSpec, KVPoll
from pdserve.engine.kv_import import Write
from pdserve.engine.model_runner import ModelRunner, StepPlan

CMD_STOP, CMD_RUN, CMD_EXPORT, CMD_IMPORT, CMD_KV_APPLY, CMD_KV_STEP, CMD_KV_POLL = range(7)


class Executor:
    def __init__(self, cfg: EngineConfig, model_path: Path, kv_connector: KVConnectorSpec | None = None):
        self.cfg, self.model_path, self.kv_connector = cfg, model_path, kv_connector
        self.procs: list[subprocess.Popen] = []
        self.runner: ModelRunner | None = None

    def start(self) -> None:
        tp = self.cfg.tp
        self.store_dir = tempfile.TemporaryDirectory(prefix="pdserve-tp-")
        store = os.path.join(self.store_dir.name, "store")
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        for rank in range(1, tp):
            cmd = [sys.executable, "-m", "pdserve.engine.worker", "--rank", str(rank), "--store", store,
                   "--model-path", str(self.model_path), "--config", self.cfg.to_json()]
            if self.kv_connector is not None:
                cmd += ["--kv-connector", self.kv_connector.to_json()]
            self.procs.append(subprocess.Popen(cmd, env=env))
        try:
            parallel.init(0, tp, store, self.backend, self.cfg.rank_device(0), check_alive=self._check_ranks)
            self.runner = ModelRunner(self.cfg, self.model_path, 0, self.kv_connector)
        except BaseException:
            self.close()
            raise

    def _check_ranks(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                raise RuntimeError(f"TP rank {rank} exited with status {p.returncode} during start-up")

    @property
    def backend(self) -> str:
        return "nccl" if self.cfg.is_cuda else "gloo"

    def execute(self, plan: StepPlan, meta: KVConnectorMetadata | None = None) -> torch.Tensor | None:
        """Run a step on every rank; meta (its KV saves) goes to the ranks first."""
        if self.procs:
            if meta:
                self._send_bytes(CMD_KV_STEP, meta.encode())
            header, body = plan.pack()
            self._broadcast(torch.cat([torch.tensor([CMD_RUN]), header]))
            self._broadcast(body)
        return self.runner.execute(plan, meta)

    def export_kv(self, layer_start: int, num_layers: int, block_ids: list[int]) -> list[list[torch.Tensor]]:
        """[layer][tp rank] KV shards of block_ids for layers [layer_start, +num_layers)."""
        self._send_kv_command(CMD_EXPORT, layer_start, num_layers, block_ids)
        return self.runner.export_kv(layer_start, num_layers, block_ids)

    def import_kv(self, writes: list[Write]) -> None:
        """Apply a batch of KV writes on every rank in one operation (one scatter)."""
        for block_ids, _, layers in writes:
            self.runner.check_kv_shards(len(block_ids), layers)  # before any rank is told to wait for data
        entries = [(start, len(layers), block_ids) for block_ids, start, layers in writes]
        if self.procs:
            body = pack_imports(entries)
            self._broadcast(torch.tensor([CMD_IMPORT, body.numel(), 0, 0, 0]))
            self._broadcast(body)
        self.runner.import_kv(entries, [layers for _, _, layers in writes])

    def kv_apply(self, meta: KVConnectorMetadata) -> None:
        """The KV connector's between-steps work (channels, loads) on every rank."""
        if self.procs:
            self._send_bytes(CMD_KV_APPLY, meta.encode())
        self.runner.kv_apply(meta)

    def kv_poll(self, keys: list[int]) -> dict[int, tuple[KVPoll, str]]:
        """Transfers among keys that ended on every rank (a collective): key -> (state, error)."""
        if self.procs:
            self._broadcast(torch.tensor([CMD_KV_POLL, len(keys), 0, 0, 0]))
            self._broadcast(torch.tensor(keys, dtype=torch.long))
        return self.runner.kv_poll(keys)

    def _send_bytes(self, cmd: int, data: bytes) -> None:
        self._broadcast(torch.tensor([cmd, len(data), 0, 0, 0]))
        self._broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def _send_kv_command(self, cmd: int, layer_start: int, num_layers: int, block_ids: list[int]) -> None:
        if self.procs:
            self._broadcast(torch.tensor([cmd, layer_start, num_layers, len(block_ids), 0]))
            self._broadcast(torch.tensor(block_ids, dtype=torch.long))

    def _broadcast(self, x: torch.Tensor) -> None:
        if self.procs:
            parallel.broadcast(x.to(self.runner.device if self.backend == "nccl" else "cpu"))

    def close(self) -> None:
        if self.procs and self.runner is not None:
            try:
                self._broadcast(torch.tensor([CMD_STOP, 0, 0, 0, 0]))
            except Exception:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.runner is not None:
            self.runner.close_kv()
        self.runner = None  # its CUDA graphs hold NCCL work: they go before the communicator does
        if self.cfg.tp > 1:
            _release_cuda()
            parallel.destroy()
        if getattr(self, "store_dir", None) is not None:
            self.store_dir.cleanup()
            self.store_dir = None


def pack_imports(entries: list[tuple[int, int, list[int]]]) -> torch.Tensor:
    """(layer_start, num_layers, block_ids) entries as one int64 body."""
    flat: list[int] = []
    for start, n, blocks in entries:
        flat += [start, n, len(blocks), *blocks]
    return torch.tensor(flat, dtype=torch.long)


def unpack_imports(body: list[int]) -> list[tuple[int, int, list[int]]]:
    entries, i = [], 0
    while i < len(body):
        start, n, nb = body[i:i + 3]
        entries.append((start, n, body[i + 3:i + 3 + nb]))
        i += 3 + nb
    return entries


def _release_cuda() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
