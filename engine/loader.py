"""Find a model, read its config and tokenizer, and load weights into the rank's shards.

A model is a Hugging Face checkpoint folder (config.json + *.safetensors, sharded or
not) or a GGUF file. A GGUF file is converted once, through transformers' GGUF
reader, into a cached safetensors folder, so every later start (and every TP rank)
loads the same fast way. Nothing is ever fetched from a model hub."""
from __future__ import annotations

import glob
import os
from pathlib import Path

import torch
from torch import nn

from pdserve.common import model_files
from pdserve.common.model_files import DEFAULT_MODEL, converted_dir, model_source  # noqa: F401 (DEFAULT_MODEL re-exported)



def resolve_model(model: str | None) -> Path:
    """Return a checkpoint folder for `model`: a folder, a .gguf file (converted once), or the default name."""
    src = model_source(model)
    if src.is_dir():
        return src
    return _convert_gguf(src, DEFAULT_MODEL if model in (None, "", DEFAULT_MODEL) else src.stem)


def _convert_gguf(gguf: Path, name: str) -> Path:
    out = converted_dir(gguf, name)
    if (out / "model.safetensors").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first
        pass
    return out


def load_config(path: Path):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path, local_files_only=True)


def load_tokenizer(path: Path):
    """The checkpoint folder's tokenizer, or None for a weights-only folder (token-id prompts only)."""
    return model_files.load_tokenizer(str(path))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load every checkpoint tensor into its (sharded) parameter; fail on anything missing."""
    from safetensors import safe_open
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                target, shard = _target(name, model)
                if target is None:
                    continue
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name} has no parameter {target}")
                param = params[target]
                loader = param.weight_loader
                with torch.no_grad():
                    if shard is None:
                        loader(param, f.get_slice(name))
                    else:
                        loader(param, f.get_slice(name), shard)
                loaded.add(f"{target}:{shard}")
    expected = _expected_keys(model)
    missing = sorted(expected - loaded)
    if model.spec.tie_word_embeddings:
        missing = [m for m in missing if not m.startswith("lm_head.")]
    if missing:
        raise KeyError(f"checkpoint {path} lacks tensors for: {missing[:8]}")


def init_dummy_weights(model: nn.Module, std: float = 0.02) -> None:
    """Random weights for benchmarks (vLLM's load format "dummy"): matrices ~N(0, std),
    norms 1, biases 0, seeded so every run builds the same model."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(0))
                p.normal_(0.0, std, generator=gen)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()


def _target(name: str, model: nn.Module) -> tuple[str | None, str | None]:
    if "rotary_emb" in name:
        return None, None
    name = name.removeprefix("model.")
    if name.startswith("lm_head.") and model.spec.tie_word_embeddings:
        return None, None
    for src, (dst, shard) in model.packed.items():
        if f".{src}." in name:
            return name.replace(f".{src}.", f".{dst}."), shard
    return name, None


def _expected_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, module in model.named_modules():
        shards = getattr(module, "shards", None)
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            keys.update(f"{full}:{s[0]}" for s in shards) if shards else keys.add(f"{full}:None")
    return keys
