"""`pdserve bench` against a real local cluster: counts add up, metrics agree with
the per-request lists, SLO attainment follows the thresholds."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pdserve.bench import arrival_gaps
from tests.cluster_util import start_cluster


@pytest.fixture(scope="module")
def cluster(tiny_models):
    c = start_cluster(model=tiny_models["qwen3"], kv_blocks=256)
    yield c
    c.stop()


def bench(cluster, tmp_path, *flags: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", cluster.cfg.listen,
                        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
                        "--disable-tqdm", *flags], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((tmp_path / "r.json").read_text())


def test_every_request_is_measured_once_and_the_summary_agrees_with_the_lists(cluster, tmp_path):
    s = bench(cluster, tmp_path, "--num-prompts", "24", "--request-rate", "30", "--random-input-len", "40",
              "--random-output-len", "12", "--random-range-ratio", "0.5", "--goodput", "ttft:60000", "tpot:60000")
    n = s["completed"]
    assert n == 24 and s["failed"] == 0 and not s["errors"]
    assert len(s["ttfts"]) == len(s["e2els"]) == len(s["itls"]) == len(s["output_lens"]) == n
    assert sum(s["output_lens"]) == s["total_output_tokens"] and sum(s["input_lens"]) == s["total_input_tokens"]
    assert all(len(itl) == out - 1 for itl, out in zip(s["itls"], s["output_lens"]))
    assert all(0 < t <= e for t, e in zip(s["ttfts"], s["e2els"]))
    tpots = [(e - t) / (o - 1) for t, e, o in zip(s["ttfts"], s["e2els"], s["output_lens"]) if o > 1]
    assert s["mean_tpot_ms"] == pytest.approx(1e3 * np.mean(tpots))
    assert s["mean_ttft_ms"] == pytest.approx(1e3 * np.mean(s["ttfts"]))
    assert s["slo_attainment"] == 1.0 and s["request_goodput"] == pytest.approx(n / s["duration"])
    assert set(s["ttft_split_mean_ms"]) == {"queue", "prefill", "transfer", "decode_admission"}


def test_an_slo_no_request_can_meet_gives_zero_goodput(cluster, tmp_path):
    s = bench(cluster, tmp_path, "--num-prompts", "6", "--random-input-len", "20", "--random-output-len", "4",
              "--goodput", "ttft:0.0001")
    assert s["completed"] == 6 and s["slo_attainment"] == 0.0 and s["request_goodput"] == 0.0


def test_poisson_arrivals_have_the_requested_rate_and_burstiness_keeps_the_mean():
    for burstiness in (1.0, 0.25, 4.0):
        gaps = arrival_gaps(20000, rate=50.0, burstiness=burstiness, seed=1)
        assert np.mean(gaps) == pytest.approx(1 / 50.0, rel=0.05)
    assert np.std(arrival_gaps(20000, 50.0, 0.25, 1)) > np.std(arrival_gaps(20000, 50.0, 4.0, 1))
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]


def test_bisection_converges_on_a_synthetic_attainment_curve():
    from pdserve.goodput import max_rate_meeting
    knee = 7.3  # attainment is 1 up to the knee, then below 0.9

    def attainment(rate: float) -> float:
        return 1.0 if rate <= knee else max(0.0, 0.9 - (rate - knee) * 0.1)
    calls = []
    found = max_rate_meeting(lambda r: calls.append(r) or attainment(r), lo=1.0, hi=20.0, steps=12)
    assert found == pytest.approx(knee, abs=20 / 2 ** 12) and found <= knee and len(calls) == 12


@pytest.mark.parametrize("knee, rates, extended", [(50.0, "4,8", [16.0, 32.0, 64.0]), (0.7, "4,8", [0.5, 1.0, 2.0])])
def test_a_sweep_that_does_not_bracket_the_goodput_widens_its_rates(knee, rates, extended):
    import argparse
    from pdserve.goodput import sweep
    n = 20

    def run(a):  # a synthetic cluster: every request meets the SLOs up to the knee rate, none above
        ok = a.request_rate <= knee
        return {"num_prompts": n, "ttfts": [0.001 if ok else 9.0] * n, "e2els": [0.002] * n, "output_lens": [2] * n,
                "request_throughput": a.request_rate}
    a = argparse.Namespace(sweep=rates, sweep_extend=3, bisect_steps=2, request_rate=None)
    result = sweep(a, run, {"ttft": 100.0})
    rates_run = [c["rate"] for c in result["curve"]]
    assert sorted(set(rates_run) - {4.0, 8.0}) == extended
    assert 0 < result["max_goodput_rate"] <= knee
    assert result["bracketed"]  # the widened rates found a rate that misses


def test_a_run_at_a_higher_rate_sends_more_requests_for_the_same_duration():
    from pdserve.bench import prompts_at
    assert prompts_at(4.0, 60, 0.0, 3000) == 60             # fixed count by default
    assert prompts_at(4.0, 60, 10.0, 3000) == 60            # 40 would be fewer than asked for
    assert prompts_at(32.0, 60, 10.0, 3000) == 320          # 10 s of arrivals
    assert prompts_at(512.0, 60, 10.0, 3000) == 3000        # capped
    assert prompts_at(float("inf"), 60, 10.0, 3000) == 60   # all at once: the count as given


def test_a_sweep_every_rate_of_which_meets_the_slos_says_its_goodput_is_a_lower_bound():
    import argparse
    from pdserve.goodput import markdown, sweep
    n = 10
    a = argparse.Namespace(sweep="1,2", sweep_extend=1, bisect_steps=2, request_rate=None)
    result = sweep(a, lambda a: {"num_prompts": n, "ttfts": [0.001] * n, "e2els": [0.002] * n, "output_lens": [2] * n,
                                 "request_throughput": a.request_rate}, {"ttft": 100.0})
    assert [c["rate"] for c in result["curve"]] == [1.0, 2.0, 4.0]
    assert result["max_goodput_rate"] == 4.0 and not result["bracketed"]
    assert "lower bound" in markdown({"slos_ms": {"ttft": 100.0}, "sweep": result})


def test_a_rate_sweep_writes_curves_max_goodput_summary_and_plot(cluster, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", cluster.cfg.listen,
                        "--num-prompts", "12", "--random-input-len", "24", "--random-output-len", "6",
                        "--goodput", "ttft:60000", "tpot:60000", "--sweep", "5,20", "--bisect-steps", "1",
                        "--sweep-extend", "0", "--sweep-duration", "1",
                        "--slo-scale", "0.5,1,2", "--result-dir", str(tmp_path), "--result-filename", "g.json",
                        "--disable-tqdm"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "g.json").read_text())
    assert [c["rate"] for c in result["sweep"]["curve"]] == [5.0, 20.0]
    assert [c["num_prompts"] for c in result["sweep"]["curve"]] == [12, 20]  # 1 s of arrivals at 20 req/s
    assert all(c["both"] == 1.0 for c in result["sweep"]["curve"])  # SLOs no request can miss
    assert result["sweep"]["max_goodput_rate"] == 20.0
    assert [s["scale"] for s in result["slo_scale"]] == [0.5, 1.0, 2.0]
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert "Maximum goodput" in (tmp_path / "g.md").read_text()


def test_every_result_json_has_the_fields_a_script_reads():
    """Every JSON under benchmarks/results/ (headlines, sweeps, a run's raw parts) carries
    benchmark, device, date, commit, ratio, target and config at the top level."""
    from benchmarks.common import REQUIRED_FIELDS, RESULTS
    files = sorted(RESULTS.rglob("*.json"))
    assert files
    missing = {}
    for path in files:
        data = json.loads(path.read_text())
        lacks = [k for k in REQUIRED_FIELDS if not isinstance(data, dict) or k not in data]
        if lacks:
            missing[str(path.relative_to(RESULTS))] = lacks
    assert not missing


def test_stamp_parts_gives_raw_files_the_headline_fields_and_keeps_theirs(tmp_path):
    from benchmarks.common import REQUIRED_FIELDS, stamp_parts
    head = dict(benchmark="goodput_x", device="D", date="2026-01-01", commit="abc", ratio=1.5, target=2.0,
                config={"rates": "4,8"})
    (tmp_path / "baseline.json").write_text(json.dumps({"date": "20260101-000000", "median_ttft_ms": 12.0}))
    (tmp_path / "curve.json").write_text(json.dumps([1, 2]))
    assert len(stamp_parts(tmp_path, head)) == 2
    base = json.loads((tmp_path / "baseline.json").read_text())
    assert {k: base[k] for k in REQUIRED_FIELDS} == head
    assert base["part"] == "baseline" and base["raw_date"] == "20260101-000000" and base["median_ttft_ms"] == 12.0
    assert json.loads((tmp_path / "curve.json").read_text())["data"] == [1, 2]
    assert stamp_parts(tmp_path, head) == []  # already stamped: left alone
