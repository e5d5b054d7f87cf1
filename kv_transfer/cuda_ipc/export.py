"""A decode rank's KV pool as another process on the same host opens it.

CUDA: torch's CUDA IPC reduction of the k and v tensors (cudaIpcGetMemHandle of their
allocation, offsets, torch's IPC ref counter and event), carried field by field in a
KVIpcExport protobuf message, never pickled; the peer rebuilds the tensors with
torch.multiprocessing.reductions.rebuild_cuda_tensor. CPU (the double CI runs): the
pool is moved into shared memory in place, and the peer maps the owner's descriptor
through /proc/<pid>/fd. Either way the peer writes straight into the pool."""
from __future__ import annotations

import hashlib
import os
import socket

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from pdserve.kv_transfer.base.layout import DTYPES, dtype_name
from pdserve.v1 import kv_pb2
from pdserve.wire.protocol import PROTOCOL_VERSION


def host_id() -> str:
    """This host as both ends of a pairing compare it: the kernel's boot id and the host name."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{boot}|{socket.gethostname()}".encode()).hexdigest()[:16]


def export_pool(k: torch.Tensor, v: torch.Tensor, tp_rank: int) -> kv_pb2.KVIpcExport:
    """Export this process's pool (k, v: [layers, blocks, block_size, heads, head_dim])."""
    msg = kv_pb2.KVIpcExport(protocol_version=PROTOCOL_VERSION, host_id=host_id(), tp_rank=tp_rank,
                             device=k.device.type, device_index=k.device.index or 0, shape=list(k.shape),
                             dtype=dtype_name(k.dtype))
    for t, buf in ((k, msg.k), (v, msg.v)):
        if not t.is_contiguous():
            raise ValueError("a KV pool must be contiguous to be exported")
        buf.CopyFrom(_export_cuda(t) if t.is_cuda else _export_cpu(t))
    return msg


def open_pool(msg: kv_pb2.KVIpcExport) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer's (k, v), writable from this process; ValueError where it cannot be opened here."""
    if msg.protocol_version != PROTOCOL_VERSION:
        raise ValueError(f"KV export of protocol version {msg.protocol_version}, this node speaks {PROTOCOL_VERSION}")
    if msg.host_id != host_id():
        raise ValueError(f"cuda-ipc needs both nodes on one host: the decode rank is on host {msg.host_id}, this "
                         f"prefill rank on {host_id()}; use --kv-transport zmq or nccl between hosts")
    if msg.dtype not in DTYPES:
        raise ValueError(f"KV export of dtype {msg.dtype}")
    shape, dtype = tuple(msg.shape), DTYPES[msg.dtype]
    if msg.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("the decode node's KV pool is on a GPU and this prefill rank has no CUDA")
        return tuple(_open_cuda(b, shape, dtype, msg.device_index) for b in (msg.k, msg.v))
    return tuple(_open_cpu(b, shape, dtype) for b in (msg.k, msg.v))


def _export_cuda(t: torch.Tensor) -> kv_pb2.KVIpcBuffer:
    (_, _, _, offset, _, _, _, handle, size, storage_offset, _, ref_handle, ref_offset, event, sync) = reduce_tensor(t)[1]
    return kv_pb2.KVIpcBuffer(handle=handle, storage_size_bytes=size, storage_offset_bytes=storage_offset,
                              tensor_offset=offset, ref_counter_handle=ref_handle, ref_counter_offset=ref_offset,
                              event_handle=event or b"", event_sync_required=sync)


def _open_cuda(b: kv_pb2.KVIpcBuffer, shape, dtype, device: int) -> torch.Tensor:
    stride = torch.empty(shape, device="meta").stride()
    return rebuild_cuda_tensor(torch.Tensor, torch.Size(shape), stride, b.tensor_offset, torch.UntypedStorage,
                               dtype, device, b.handle, b.storage_size_bytes, b.storage_offset_bytes, False,
                               b.ref_counter_handle, b.ref_counter_offset, b.event_handle or None,
                               b.event_sync_required)


def _export_cpu(t: torch.Tensor) -> kv_pb2.KVIpcBuffer:
    t.share_memory_()  # in place: every view of the pool (the attention layers' caches) follows
    fd, size = t.untyped_storage()._share_fd_cpu_()
    return kv_pb2.KVIpcBuffer(pid=os.getpid(), fd=fd, storage_size_bytes=size, tensor_offset=t.storage_offset())


def _open_cpu(b: kv_pb2.KVIpcBuffer, shape, dtype) -> torch.Tensor:
    try:
        storage = torch.UntypedStorage.from_file(f"/proc/{b.pid}/fd/{b.fd}", shared=True, nbytes=b.storage_size_bytes)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"the decode rank's shared KV pool (pid {b.pid}) cannot be opened: {e}") from None
    flat = torch.empty(0, dtype=dtype).set_(storage)
    n = 1
    for d in shape:
        n *= d
    return flat[b.tensor_offset:b.tensor_offset + n].view(shape)
