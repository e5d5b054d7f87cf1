"""Entry point of a TP rank other than 0: load the shard, then run what rank 0 says."""
from __future__ import annotations

import argparse
import ctypes
import signal
from pathlib import Path

import torch

from pdserve.engine import parallel
from pdserve.common.config import EngineConfig
from pdserve.engine.executor import (CMD_EXPORT, CMD_IMPORT, CMD_KV_APPLY, CMD_KV_POLL, CMD_KV_STEP, CMD_RUN,
                                     CMD_STOP, _release_cuda, unpack_imports)
from pdserve.engine.kv_connector import KVConnectorMetadata, KVConnectorSpec
from pdserve.engine.model_runner import ModelRunner, StepPlan


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--kv-connector", default=None, help="KVConnectorSpec as JSON: the worker this rank builds")
    args = ap.parse_args()
    _die_with_parent()
    cfg = EngineConfig.from_json(args.config)
    device = cfg.rank_device(args.rank)
    backend = "nccl" if cfg.is_cuda else "gloo"
    parallel.init(args.rank, cfg.tp, args.store, backend, device)
    spec = KVConnectorSpec.from_json(args.kv_connector) if args.kv_connector else None
    runner = ModelRunner(cfg, Path(args.model_path), args.rank, spec)
    comm = device if backend == "nccl" else torch.device("cpu")
    step_meta = None  # KV saves of the next RUN

    def receive_bytes(n: int) -> bytes:
        return bytes(parallel.broadcast(torch.empty(n, dtype=torch.uint8, device=comm)).cpu().numpy())

    while True:
        cmd = parallel.broadcast(torch.empty(5, dtype=torch.long, device=comm)).cpu()
        kind, args = cmd[0].item(), cmd[1:]
        if kind == CMD_STOP:
            break
        if kind == CMD_RUN:
            body = parallel.broadcast(torch.empty(StepPlan.body_numel(args), dtype=torch.long, device=comm))
            runner.execute(StepPlan.unpack(args, body.cpu()), step_meta)
            step_meta = None
            continue
        if kind in (CMD_KV_APPLY, CMD_KV_STEP):
            meta = KVConnectorMetadata.decode(receive_bytes(args[0].item()))
            if kind == CMD_KV_APPLY:
                runner.kv_apply(meta)
            else:
                step_meta = meta
            continue
        if kind == CMD_KV_POLL:
            keys = parallel.broadcast(torch.empty(args[0].item(), dtype=torch.long, device=comm)).cpu().tolist()
            runner.kv_poll(keys)
            continue
        if kind == CMD_IMPORT:
            body = parallel.broadcast(torch.empty(args[0].item(), dtype=torch.long, device=comm)).cpu().tolist()
            runner.import_kv(unpack_imports(body), None)
            continue
        if kind != CMD_EXPORT:
            raise RuntimeError(f"unknown command {kind}")
        layer_start, num_layers, num_blocks = args[:3].tolist()
        blocks = parallel.broadcast(torch.empty(num_blocks, dtype=torch.long, device=comm)).cpu().tolist()
        runner.export_kv(layer_start, num_layers, blocks)
    runner.close_kv()
    del runner  # CUDA graphs before the communicator
    _release_cuda()
    parallel.destroy()


if __name__ == "__main__":
    main()
