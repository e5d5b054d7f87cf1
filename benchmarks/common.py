"""Shared by the benchmarks: model shapes, result files, device facts."""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Hugging Face config fields of the shapes the benchmarks use (random weights).
SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=False),
}


def hf_config(shape: str):
    from transformers import AutoConfig
    fields = dict(SHAPES[shape])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def write_config_folder(shape: str, path: Path) -> Path:
    """A checkpoint folder with config.json only (our engine runs it with load_format=dummy)."""
    path.mkdir(parents=True, exist_ok=True)
    hf_config(shape).save_pretrained(path)
    return path


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def commit(given: str | None = None) -> str:
    """The commit measured: given by flag where the tree has no .git (the GPU machine's copy)."""
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def uncommitted_changes() -> bool | None:
    """Whether the transports or the benchmarks differ from the commit measured (None: no git)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "kv_transfer", "benchmarks"],
                             capture_output=True, text=True, cwd=RESULTS.parent.parent, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.stdout.strip())


def write_result(name: str, benchmark: str, ratio: float | None, target: float, config: dict, commit_id: str | None = None,
                 folder: Path | None = None, **details) -> Path:
    """folder: where the JSON goes (results/ unless given, e.g. for a smoke run)."""
    import torch
    result = dict(benchmark=benchmark, device=device_name(), date=datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"), commit=commit(commit_id), ratio=None if ratio is None else round(ratio, 4), target=target,
                  config=config, torch=torch.__version__, **details)
    folder = RESULTS if folder is None else folder
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.json"
    from pdserve.bench_result import jsonable  # infinite values as "inf": valid JSON
    path.write_text(json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n")
    return path


REQUIRED_FIELDS = ("benchmark", "device", "date", "commit", "ratio", "target", "config")  # every result JSON's


def stamp_parts(folder: Path, headline: dict) -> list[Path]:
    """Give each detail JSON in folder (a run's raw files kept beside its headline result,
    like a goodput sweep's per-side curves) the headline's top-level fields and `part`
    (its file name), so that every JSON under results/ can be read by the same script.
    A field the file already had under one of those names is kept as raw_<name>."""
    stamped = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {"data": data}
        if all(data.get(k) == headline[k] for k in REQUIRED_FIELDS):
            continue
        kept = {(f"raw_{k}" if k in REQUIRED_FIELDS or k == "part" else k): v for k, v in data.items()}
        path.write_text(json.dumps({**{k: headline[k] for k in REQUIRED_FIELDS}, "part": path.stem, **kept},
                                   indent=2) + "\n")
        stamped.append(path)
    return stamped


LOCK = Path(tempfile.gettempdir()) / "pdserve-gpu-bench.lock"  # held by every benchmark that watches its host


def _descendants(root: int) -> set[int]:
    """root and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def foreign_gpu_processes() -> list[dict] | None:
    """Compute processes on any GPU of the host that are not this process or below it
    (nvidia-smi); None where nvidia-smi cannot tell."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    ours = _descendants(os.getpid())
    apps = [dict(zip(("pid", "name", "mib"), (x.strip() for x in line.split(",")))) for line in out.stdout.splitlines()
            if line.strip()]
    return [a for a in apps if a["pid"].isdigit() and int(a["pid"]) not in ours]


class HostWatch:
    """Whether a benchmark had its host to itself: an exclusive lock (LOCK) against other
    benchmarks, and nvidia-smi's compute processes not ours, sampled every period_s.
    Entering refuses (SystemExit) a host already shared unless allow_shared; what was
    seen is record()'s, for the result JSON."""

    def __init__(self, allow_shared: bool = False, period_s: float = 10.0):
        self.allow_shared, self.period_s = allow_shared, period_s
        self.seen: dict[str, dict] = {}
        self.lock_holder: str | None = None
        self.smi = True
        self._stop = threading.Event()

    def __enter__(self) -> "HostWatch":
        self._fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()} {' '.join(sys.argv)}".encode())
        except BlockingIOError:
            self.lock_holder = Path(LOCK).read_text().strip() or "unknown"
        self.sample()
        if self.shared() and not self.allow_shared:
            sys.exit(f"host shared ({self.describe()}): refusing to measure; --allow-shared runs and flags it")
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.period_s + 30)
        self.sample()
        os.close(self._fd)  # releases the lock

    def _watch(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        apps = foreign_gpu_processes()
        self.smi = self.smi and apps is not None
        for a in apps or []:
            self.seen.setdefault(a["pid"], a)

    def shared(self) -> bool:
        return bool(self.lock_holder or self.seen)

    def describe(self) -> str:
        parts = [f"benchmark lock held by {self.lock_holder}"] if self.lock_holder else []
        parts += [f"GPU process {a['pid']} {a['name']} ({a['mib']} MiB)" for a in self.seen.values()]
        return "; ".join(parts) or ("alone" if self.smi else "alone as far as the lock tells (no nvidia-smi)")

    def record(self) -> dict:
        return dict(shared=self.shared(), lock_holder=self.lock_holder, foreign_gpu_processes=list(self.seen.values()),
                    nvidia_smi=self.smi, summary=self.describe())
