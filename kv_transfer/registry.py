"""The KV backends by --kv-transport name. A backend's config (its config.py) imports
nothing heavy; its manager and connector (its backend.py) load only when a node uses it."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

PACKAGES = {"zmq": "pdserve.kv_transfer.zmq", "nccl": "pdserve.kv_transfer.nccl",
            "cuda-ipc": "pdserve.kv_transfer.cuda_ipc", "fake": "pdserve.kv_transfer.fake"}
CONFIGS = {"zmq": "ZmqConfig", "nccl": "NcclConfig", "cuda-ipc": "IpcConfig", "fake": "FakeConfig"}


AUTO = "auto"


def names() -> list[str]:
    return list(PACKAGES)


def resolve(name: str, device: str, role: str = "", coordinator: str = "") -> str:
    """--kv-transport as a node runs it: auto is cuda-ipc for a prefill or decode node on
    CUDA whose coordinator is on loopback (then every node is on this host), zmq otherwise."""
    return name if name != AUTO else auto_choice(device, role, coordinator)[0]


def auto_choice(device: str, role: str, coordinator: str = "") -> tuple[str, str]:
    """(transport, why) of --kv-transport auto; why is set where a CUDA node of a pair gets
    zmq, which it should say aloud (cuda-ipc may have been what the user hoped for)."""
    if not device.startswith("cuda") or role not in ("prefill", "decode"):
        return "zmq", ""
    host = coordinator.rpartition(":")[0].strip("[]") if ":" in coordinator else coordinator
    if host and host != "localhost" and not host.startswith("127.") and host != "::1":
        return "zmq", (f"the coordinator {coordinator} is not on loopback, so peers may be on other hosts; pass "
                       f"--kv-transport cuda-ipc (nodes of one host) or nccl to move the KV GPU to GPU")
    return "cuda-ipc", ""


def config_class(name: str) -> type:
    if name == AUTO:  # the options of what auto picks are those of every backend
        raise ValueError("resolve --kv-transport auto (registry.resolve) before asking for its config")
    if name not in PACKAGES:
        raise ValueError(f"--kv-transport {name!r} is not available ({', '.join(PACKAGES)})")
    return getattr(importlib.import_module(f"{PACKAGES[name]}.config"), CONFIGS[name])


def make_config(name: str, **given: Any) -> Any:
    """The backend's config from the options given (None: not given, the default holds);
    an option the backend does not have is an error."""
    cls = config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in given.items() if v is not None}
    if extra := sorted(set(given) - fields):
        raise ValueError(f"the {name} KV transport has no option {', '.join(extra)}")
    return cls(**given)


def backend(name: str):
    """The backend's base.backend.KVBackend."""
    config_class(name)
    return importlib.import_module(f"{PACKAGES[name]}.backend").BACKEND
