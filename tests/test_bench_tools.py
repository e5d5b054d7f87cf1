"""The measurement tooling around the benchmarks: the README figure check, the host
lock that refuses or flags a shared host, the goodput ratio at every SLO scale, and
gpu_suite.sh failing loudly for groups the host cannot run."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module(path: Path, name: str):
    sys.path.insert(0, str(path.parent))  # the benchmarks import their siblings
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(path.parent))


def test_every_figure_the_readmes_quote_matches_its_result_json():
    check = _module(ROOT / "scripts" / "check_readme.py", "check_readme")
    assert check.check() == [], "fix the README or scripts/check_readme.py CLAIMS"


def _copy_tree(tmp_path: Path) -> Path:
    for rel in ("README.md", "benchmarks/README.md", "docs/RESULTS.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results",
                    ignore=shutil.ignore_patterns("*.png"))
    return tmp_path


def test_the_figure_check_fails_on_a_changed_result_an_unclaimed_figure_and_a_broken_condition(tmp_path):
    check = _module(ROOT / "scripts" / "check_readme.py", "check_readme")
    root = _copy_tree(tmp_path)
    res = root / "benchmarks" / "results" / "goodput_prefill_heavy.json"
    data = json.loads(res.read_text())
    data["ratio"] = 1.91
    res.write_text(json.dumps(data))
    problems = check.check(root)
    assert any("quotes 2.00 where goodput_prefill_heavy.json's ratio is 1.91" in p for p in problems)
    readme = root / "benchmarks" / "README.md"
    readme.write_text(readme.read_text() + "\nThe relay moved 3.7x more than before.\n")
    assert any("figure 3.7x is in no claim" in p for p in check.check(root))
    nccl = root / "benchmarks" / "results" / "kv_transfer_nccl.json"
    data = json.loads(nccl.read_text())
    data["target"] = 0.5
    nccl.write_text(json.dumps(data))
    assert any("bandwidth ratio below its target" in p for p in check.check(root))


def test_a_second_benchmark_on_the_host_is_refused_or_flagged(tmp_path, monkeypatch):
    common = _module(ROOT / "benchmarks" / "common.py", "bench_common")
    monkeypatch.setattr(common, "LOCK", tmp_path / "lock")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
fd = os.open({str(tmp_path / 'lock')!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"4242 goodput.py")
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match="host shared .*4242 goodput.py"):
            with common.HostWatch(period_s=0.1):
                pass
        with common.HostWatch(allow_shared=True, period_s=0.1) as host:
            pass
        rec = host.record()
        assert rec["shared"] and rec["lock_holder"] == "4242 goodput.py"
    finally:
        holder.kill()
        holder.wait()
    with common.HostWatch(period_s=0.1) as alone:  # the holder is gone: the lock is free
        pass
    assert alone.record()["lock_holder"] is None
    assert alone.record()["shared"] == bool(alone.seen)  # other GPU work only where nvidia-smi shows some


def test_the_goodput_ratio_is_given_at_every_slo_scale_with_the_range_its_runs_allow():
    goodput = _module(ROOT / "benchmarks" / "goodput.py", "bench_goodput")

    def side(rows):
        return {"bracketed": rows[1][2] is not None, "by_scale": [
            {"scale": k, "slos_ms": {}, "max_goodput_rate": lo, "next_missing_rate": hi, "bisected": k == 1.0,
             "bracketed": hi is not None} for k, lo, hi in rows]}
    disagg = side([(0.5, 8.0, 16.0), (1.0, 30.0, 32.0), (2.0, 64.0, None)])
    coloc = side([(0.5, 0.0, 4.0), (1.0, 15.0, 16.0), (2.0, 32.0, 64.0)])
    rows = {r["scale"]: r for r in goodput.ratios_by_scale(disagg, coloc)}
    assert rows[1.0]["ratio"] == 2.0 and rows[1.0]["ratio_range"] == [30 / 16, 32 / 15] and rows[1.0]["bound"] == "exact"
    assert rows[0.5]["ratio"] is None and rows[0.5]["bound"] == "unknown"
    assert rows[2.0]["ratio"] == 2.0 and rows[2.0]["ratio_range"][1] is None and rows[2.0]["bound"] == "lower bound"


def test_gpu_suite_says_which_groups_cannot_run_and_fails():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "goodput-prefill", "nccl-tests"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "goodput-prefill: CANNOT RUN: needs 2 GPUs, 0 here" in r.stdout
    assert "nccl-tests: CANNOT RUN: needs 2 GPUs, 0 here" in r.stdout
