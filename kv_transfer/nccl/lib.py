"""A thin ctypes binding of the NCCL library (the one torch loaded), for the KV pairs'
point-to-point traffic: a 2-rank communicator, send/recv on a stream we name, abort and
the asynchronous error.

Why not torch's ProcessGroupNCCL: a send through it costs the host tens of microseconds
(a work object, events on its own NCCL stream, a stream switch to make that stream wait
for the current one), and a KV transfer issues a dozen of them, the first on the
critical path of every request. Here a send is one C call, queued on the pair's own
stream behind its gather, with nothing else around it. ncclCommRegister'd buffers
(zero-copy between the GPUs) gained nothing at KV sizes and are not used.

Only what the transport uses is bound. Every call raises NcclError on failure."""
from __future__ import annotations

import ctypes
import glob
import os

SUCCESS, IN_PROGRESS = 0, 7
UINT8 = 1
_UNDEF_INT = -(2 ** 31)  # NCCL_CONFIG_UNDEF_INT: "NCCL's choice"
_MAGIC = 0xCAFEBEEF


class NcclError(RuntimeError):
    def __init__(self, what: str, code: int, detail: str = ""):
        self.code = code
        super().__init__(f"{what}: NCCL error {code} ({_error_string(code)}){': ' + detail if detail else ''}")


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


class _Config(ctypes.Structure):
    """ncclConfig_t as of NCCL 2.18. NCCL copies `size` bytes of it and gives every later
    field its default, so this prefix stays valid in later versions."""
    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
                ("blocking", ctypes.c_int), ("cgaClusterSize", ctypes.c_int), ("minCTAs", ctypes.c_int),
                ("maxCTAs", ctypes.c_int), ("netName", ctypes.c_char_p), ("splitShare", ctypes.c_int)]


_lib: ctypes.CDLL | None = None


def _candidates() -> list[str]:
    out = ["libnccl.so.2"]  # already in the process when torch was built against the shared library
    try:
        import nvidia.nccl  # the wheel torch depends on
        for d in nvidia.nccl.__path__:
            out += sorted(glob.glob(os.path.join(d, "lib", "libnccl.so*")))
    except ImportError:
        pass
    return out


def lib() -> ctypes.CDLL:
    """The NCCL library, loaded once; torch (with CUDA) first, so the same copy is found."""
    global _lib
    if _lib is not None:
        return _lib
    import torch  # noqa: F401 - loads libnccl.so.2 where torch links it
    errors = []
    for name in _candidates():
        try:
            found = ctypes.CDLL(name)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        raise OSError("the NCCL library was not found: " + "; ".join(errors))
    c_p, c_int, c_size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    sigs = {
        "ncclGetUniqueId": [ctypes.POINTER(UniqueId)],
        "ncclCommInitRankConfig": [ctypes.POINTER(c_p), c_int, UniqueId, c_int, ctypes.POINTER(_Config)],
        "ncclCommAbort": [c_p],
        "ncclCommGetAsyncError": [c_p, ctypes.POINTER(c_int)],
        "ncclSend": [c_p, c_size, c_int, c_int, c_p, c_p],
        "ncclRecv": [c_p, c_size, c_int, c_int, c_p, c_p],
    }
    for name, args in sigs.items():
        fn = getattr(found, name, None)
        if fn is None:
            continue  # an older library: using that call fails then
        fn.argtypes, fn.restype = args, c_int
    found.ncclGetErrorString.argtypes, found.ncclGetErrorString.restype = [c_int], ctypes.c_char_p
    _lib = found
    return found


def _error_string(code: int) -> str:
    try:
        return (lib().ncclGetErrorString(code) or b"").decode(errors="replace")
    except OSError:
        return "?"


def _check(what: str, code: int) -> None:
    if code != SUCCESS:
        raise NcclError(what, code)


def unique_id() -> bytes:
    uid = UniqueId()
    _check("ncclGetUniqueId", lib().ncclGetUniqueId(ctypes.byref(uid)))
    return bytes(uid.internal)


class Comm:
    """One NCCL communicator of `nranks`, this process being `rank`, on the current CUDA
    device (the caller sets it). Blocking: the constructor returns once every rank joined."""

    def __init__(self, uid: bytes, nranks: int, rank: int, min_ctas: int = 0, max_ctas: int = 0):
        if len(uid) != 128:
            raise ValueError(f"a NCCL unique id has 128 bytes, got {len(uid)}")
        u = UniqueId()
        ctypes.memmove(u.internal, uid, 128)
        cfg = _Config(size=ctypes.sizeof(_Config), magic=_MAGIC, version=21800, blocking=1,
                      cgaClusterSize=_UNDEF_INT, minCTAs=min_ctas or _UNDEF_INT, maxCTAs=max_ctas or _UNDEF_INT,
                      netName=None, splitShare=_UNDEF_INT)
        comm = ctypes.c_void_p()
        _check("ncclCommInitRankConfig",
               lib().ncclCommInitRankConfig(ctypes.byref(comm), nranks, u, rank, ctypes.byref(cfg)))
        self.handle = comm.value
        self._send, self._recv = lib().ncclSend, lib().ncclRecv

    def send(self, ptr: int, nbytes: int, peer: int, stream: int) -> None:
        code = self._send(ptr, nbytes, UINT8, peer, self.handle, stream)
        if code != SUCCESS:
            raise NcclError("ncclSend", code)

    def recv(self, ptr: int, nbytes: int, peer: int, stream: int) -> None:
        code = self._recv(ptr, nbytes, UINT8, peer, self.handle, stream)
        if code != SUCCESS:
            raise NcclError("ncclRecv", code)

    def async_error(self) -> int:
        """NCCL's asynchronous error of this communicator: 0 while none (IN_PROGRESS while
        an operation of a non-blocking communicator is being set up)."""
        if self.handle is None:
            return SUCCESS
        err = ctypes.c_int()
        _check("ncclCommGetAsyncError", lib().ncclCommGetAsyncError(self.handle, ctypes.byref(err)))
        return err.value

    def abort(self) -> None:
        """End the communicator now: NCCL stops its kernels, a pending send or receive
        included (the stream behind them then runs on). Idempotent; never raises."""
        if self.handle is None:
            return
        handle, self.handle = self.handle, None
        lib().ncclCommAbort(handle)
