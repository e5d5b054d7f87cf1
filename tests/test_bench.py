"""`pdserve bench` against a real local cluster: counts add up, metrics agree with
the per-request lists (over every request, aligned with `errors`), requests go out on
their schedule, SLO attainment follows the thresholds, the goodput search records
every run it makes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pdserve.bench_stream import arrival_times
from tests.cluster_util import start_cluster


@pytest.fixture(scope="module")
def cluster(tiny_models):
    c = start_cluster(model=tiny_models["qwen3"], kv_blocks=256)
    yield c
    c.stop()


def bench(cluster, tmp_path, *flags: str, ok: bool = True) -> dict:
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", cluster.cfg.listen,
                        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
                        "--disable-tqdm", *flags], capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    return json.loads((tmp_path / "r.json").read_text(), parse_constant=_no_constants)


def _no_constants(name: str):
    raise AssertionError(f"{name} is not JSON")


def test_every_request_is_measured_once_and_the_summary_agrees_with_the_lists(cluster, tmp_path):
    s = bench(cluster, tmp_path, "--num-prompts", "24", "--request-rate", "30", "--random-input-len", "40",
              "--random-output-len", "12", "--random-range-ratio", "0.5", "--goodput", "ttft:60000", "tpot:60000",
              "--seed", "3", "--num-warmups", "2")
    n = s["completed"]
    assert n == 24 and s["failed"] == 0 and s["errors"] == [""] * n
    assert len(s["ttfts"]) == len(s["latencies"]) == len(s["itls"]) == len(s["output_lens"]) == len(s["start_times"]) == n
    assert sum(s["output_lens"]) == s["total_output_tokens"] and sum(s["input_lens"]) == s["total_input_tokens"]
    for itl, t, e, out in zip(s["itls"], s["ttfts"], s["latencies"], s["output_lens"]):
        assert 1 <= len(itl) + 1 <= out and all(x > 0 for x in itl)  # one gap per chunk: no zeros for merged tokens
        assert sum(itl) == pytest.approx(e - t)
    assert all(0 < t <= e for t, e in zip(s["ttfts"], s["latencies"]))
    tpots = [(e - t) / (o - 1) for t, e, o in zip(s["ttfts"], s["latencies"], s["output_lens"]) if o > 1]
    assert s["mean_tpot_ms"] == pytest.approx(1e3 * np.mean(tpots))
    assert s["mean_ttft_ms"] == pytest.approx(1e3 * np.mean(s["ttfts"]))
    assert s["slo_attainment"] == 1.0 and s["request_goodput"] == pytest.approx(n / s["duration"])
    assert set(s["ttft_split_mean_ms"]) == {"queue", "prefill", "transfer", "decode_admission"}
    # sent on the schedule (never before its instant), the rate offered recorded from the arrivals
    schedule = arrival_times(n, 30.0, 1.0, 3)
    assert all(a >= t for a, t in zip(s["arrival_times"], schedule))
    assert all(st >= a for st, a in zip(s["start_times"], s["arrival_times"]))
    assert s["achieved_request_rate"] == pytest.approx(n / max(s["arrival_times"]))
    assert s["request_rate"] == 30.0 and s["seed"] == 3 and s["num_warmups"] == 2


def test_an_unknown_model_fails_every_request_and_the_lists_stay_aligned(cluster, tmp_path):
    s = bench(cluster, tmp_path, "--num-prompts", "5", "--random-input-len", "20", "--random-output-len", "4",
              "--model", "no-such-model", "--goodput", "ttft:60000", "--save-detailed", ok=False)
    assert s["completed"] == 0 and s["failed"] == 5 and s["request_rate"] == s["achieved_request_rate"] == "inf"  # as vLLM writes it
    assert len(s["errors"]) == 5 and all(e.startswith("NOT_FOUND") for e in s["errors"])
    assert s["output_lens"] == [0] * 5 and len(s["ttfts"]) == len(s["generated_texts"]) == 5
    assert s["slo_attainment"] == 0.0 and s["total_input_tokens"] == 0


def test_the_prompt_token_count_comes_from_the_server(cluster):
    import argparse
    import asyncio
    from pdserve.bench_result import Request
    from pdserve.bench_stream import run_one
    from pdserve.v1 import api_pb2_grpc
    from pdserve.wire.rpc import channel

    async def go():
        ch = channel(cluster.cfg.listen)
        a = argparse.Namespace(temperature=0.0, ignore_eos=True, request_timeout=60, model=None)
        r = await run_one(api_pb2_grpc.GenerationStub(ch), Request(list(range(5, 22)), 999, 3), a)
        await ch.close()
        return r
    r = asyncio.run(go())
    assert r.success and r.prompt_tokens == 17 and r.output_tokens == 3 and r.finish_reason == "length"


def _results(ttfts_ms, tpots_ms, outs, failed=()):
    from pdserve.bench_result import Result
    rs = []
    for i, (t, p, o) in enumerate(zip(ttfts_ms, tpots_ms, outs)):
        r = Result(success=i not in failed, error="UNAVAILABLE: x" if i in failed else "", ttft=t / 1e3,
                   latency=(t + p * (o - 1)) / 1e3, output_tokens=o, arrival_time=0.1 * (i + 1))
        rs.append(r)
    return rs


def test_slo_attainment_counts_exactly_the_requests_inside_every_slo():
    """Thresholds between the requests' values (not at the extremes): each SLO, their
    conjunction, the boundary (<=), a failed request that would have met them, and
    one-token outputs (TPOT 0)."""
    import argparse
    from pdserve.bench_result import Request, summarize
    from pdserve.goodput import attainments, scaled
    ttfts = [10, 20, 30, 40, 50, 5]
    tpots = [1.0, 3.0, 2.0, 1.0, 0.5, 1.0]
    outs = [5, 5, 5, 1, 5, 5]
    results = _results(ttfts, tpots, outs, failed={5})
    reqs = [Request([1] * 4, 4, o) for o in outs]
    a = argparse.Namespace(model_id="m", request_rate=10.0, burstiness=1.0, seed=0, max_concurrency=None,
                           temperature=0.0, ignore_eos=True, num_warmups=0, percentile_metrics="ttft,tpot,itl,e2el",
                           metric_percentiles="50,99")
    slos = {"ttft": 40.0, "tpot": 2.0}
    s = summarize(a, reqs, results, duration=2.0, slos=slos)
    # request 0 (10 ms, 1.0), 2 (30, 2.0 on the boundary), 3 (40 on the boundary, one token) meet both;
    # 1 misses TPOT, 4 misses TTFT, 5 failed
    assert s["slo_attainment"] == pytest.approx(3 / 6) and s["request_goodput"] == pytest.approx(3 / 2.0)
    assert attainments(s, slos) == pytest.approx({"both": 3 / 6, "ttft": 4 / 6, "tpot": 4 / 6})
    assert attainments(s, scaled(slos, 0.5)) == pytest.approx({"both": 1 / 6, "ttft": 2 / 6, "tpot": 3 / 6})
    assert attainments(s, {"e2el": 15.0}) == pytest.approx({"both": 1 / 6, "ttft": 5 / 6, "tpot": 5 / 6})
    assert s["output_lens"] == [5, 5, 5, 1, 5, 0] and s["total_input_tokens"] == 20
    assert s["achieved_request_rate"] == pytest.approx(6 / 0.6)


def test_arrivals_are_rescaled_to_exactly_the_asked_rate():
    for burstiness in (1.0, 0.25, 4.0):
        for seed in (0, 1, 2):
            times = arrival_times(300, rate=15.0, burstiness=burstiness, seed=seed)
            assert times[-1] == pytest.approx(300 / 15.0, rel=1e-12)  # n / rate, whatever the draw
            assert all(b >= a for a, b in zip(times, times[1:])) and times[0] > 0
    gaps = lambda b: np.diff(arrival_times(20000, 50.0, b, 1))  # noqa: E731
    assert np.std(gaps(0.25)) > np.std(gaps(4.0))
    assert arrival_times(300, 15.0, 1.0, 0) != arrival_times(300, 15.0, 1.0, 1)
    assert arrival_times(300, 15.0, 1.0, 4) == arrival_times(300, 15.0, 1.0, 4)
    assert arrival_times(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]


def test_bisection_converges_on_a_synthetic_attainment_curve():
    from pdserve.goodput import max_rate_meeting
    knee = 7.3  # attainment is 1 up to the knee, then below 0.9

    def attainment(rate: float) -> float:
        return 1.0 if rate <= knee else max(0.0, 0.9 - (rate - knee) * 0.1)
    calls = []
    lo, hi = max_rate_meeting(lambda r: calls.append(r) or attainment(r), lo=1.0, hi=20.0, steps=12)
    assert lo == pytest.approx(knee, abs=20 / 2 ** 12) and lo <= knee < hi and len(calls) == 12


def synthetic(knee: float, n: int = 20, calls: list | None = None):
    """A synthetic cluster: every request meets a 100 ms TTFT SLO up to the knee rate, none
    above; TTFT grows with the rate so SLO scales matter; seed s shifts the knee by s/10."""
    def run(a):
        if calls is not None:
            calls.append((a.request_rate, a.seed))
        ok = a.request_rate <= knee + a.seed / 10
        t = 0.05 if ok else 0.5
        return {"num_prompts": n, "ttfts": [t] * n, "latencies": [t + 0.001] * n, "output_lens": [2] * n,
                "errors": [""] * n, "failed": 0, "duration": n / a.request_rate, "achieved_request_rate": a.request_rate,
                "request_throughput": a.request_rate}
    return run


def _args(**kw):
    import argparse
    base = dict(sweep="4,8", sweep_extend=0, bisect_steps=2, request_rate=None, seed=0, seeds=1, slo_scale=None,
                headline_scale=1.0, bisect_all_scales=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("knee, rates, extended", [(50.0, "4,8", [16.0, 32.0, 64.0]), (0.7, "4,8", [0.5, 1.0, 2.0])])
def test_a_sweep_that_does_not_bracket_the_goodput_widens_its_rates(knee, rates, extended):
    from pdserve.goodput import sweep
    result = sweep(_args(sweep=rates, sweep_extend=3), synthetic(knee), {"ttft": 100.0})
    assert sorted(c["rate"] for c in result["curve"] if c["phase"] == "extend") == extended
    assert 0 < result["max_goodput_rate"] <= knee < result["next_missing_rate"]
    assert result["bracketed"]  # the widened rates found a rate that misses


def test_every_run_the_search_makes_is_in_the_curve_with_its_seed_spread():
    """Swept, widened and bisected rates, each seed: the curve holds every run made, so
    the headline rate's attainment is in the JSON."""
    from pdserve.goodput import sweep
    calls = []
    result = sweep(_args(sweep="2,16", bisect_steps=3, seeds=3), synthetic(7.0, calls=calls), {"ttft": 100.0})
    recorded = [(c["rate"], r["seed"]) for c in result["curve"] for r in c["runs"]]
    assert sorted(recorded) == sorted(calls) and len(calls) == (2 + 3) * 3
    assert {c["phase"] for c in result["curve"]} == {"sweep", "bisect"}
    best = result["max_goodput_rate"]
    assert best in [c["rate"] for c in result["curve"]] and result["seeds"] == [0, 1, 2]
    split = next(c for c in result["curve"] if c["both_min"] != c["both_max"] or c["rate"] == best)
    assert split["both_min"] <= split["both"] <= split["both_max"]


def test_goodput_is_reported_at_every_slo_scale_and_the_headline_says_which():
    from pdserve.goodput import markdown, sweep

    def run(a):  # TTFT = rate x 10 ms: a request meets SLO 100 ms x k up to rate 10 k
        n = 10
        t = a.request_rate * 0.01
        return {"num_prompts": n, "ttfts": [t] * n, "latencies": [t] * n, "output_lens": [1] * n, "errors": [""] * n,
                "failed": 0, "duration": 1.0, "achieved_request_rate": a.request_rate, "request_throughput": 1.0}
    result = sweep(_args(sweep="2,4,8,16,32,64", bisect_steps=4, slo_scale="0.5,2", headline_scale=1.0),
                   run, {"ttft": 100.0})
    by = {g["scale"]: g for g in result["by_scale"]}
    assert sorted(by) == [0.5, 1.0, 2.0] and result["headline_scale"] == 1.0
    assert by[1.0]["bisected"] and 8.0 <= by[1.0]["max_goodput_rate"] <= 10.0 < by[1.0]["next_missing_rate"]
    assert not by[0.5]["bisected"] and by[0.5]["max_goodput_rate"] == 4.0 and by[0.5]["next_missing_rate"] == 8.0
    assert by[2.0]["max_goodput_rate"] == 16.0
    assert "SLO scale 1" in markdown({"slos_ms": {"ttft": 100.0}, "sweep": result})


def test_a_run_at_a_higher_rate_sends_more_requests_for_the_same_duration():
    from pdserve.bench import prompts_at
    assert prompts_at(4.0, 60, 0.0, 3000) == 60             # fixed count by default
    assert prompts_at(4.0, 60, 10.0, 3000) == 60            # 40 would be fewer than asked for
    assert prompts_at(32.0, 60, 10.0, 3000) == 320          # 10 s of arrivals
    assert prompts_at(512.0, 60, 10.0, 3000) == 3000        # capped
    assert prompts_at(float("inf"), 60, 10.0, 3000) == 60   # all at once: the count as given


def test_a_sweep_every_rate_of_which_meets_the_slos_says_its_goodput_is_a_lower_bound():
    from pdserve.goodput import markdown, sweep
    result = sweep(_args(sweep="1,2", sweep_extend=1), synthetic(100.0), {"ttft": 100.0})
    assert [c["rate"] for c in result["curve"]] == [1.0, 2.0, 4.0]
    assert result["max_goodput_rate"] == 4.0 and not result["bracketed"] and result["next_missing_rate"] is None
    assert "lower bound" in markdown({"slos_ms": {"ttft": 100.0}, "sweep": result})


def test_a_rate_sweep_writes_curves_max_goodput_summary_and_plot(cluster, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", cluster.cfg.listen,
                        "--num-prompts", "12", "--random-input-len", "24", "--random-output-len", "6",
                        "--goodput", "ttft:60000", "tpot:60000", "--sweep", "5,20", "--bisect-steps", "1",
                        "--sweep-extend", "0", "--sweep-duration", "1", "--seeds", "2",
                        "--slo-scale", "0.5,2", "--result-dir", str(tmp_path), "--result-filename", "g.json",
                        "--disable-tqdm"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "g.json").read_text(), parse_constant=_no_constants)
    curve = result["sweep"]["curve"]
    assert [c["rate"] for c in curve] == [5.0, 20.0]
    assert [c["num_prompts"] for c in curve] == [12, 20]  # 1 s of arrivals at 20 req/s
    assert [[run["seed"] for run in c["runs"]] for c in curve] == [[0, 1], [0, 1]]
    assert all(run["achieved_rate"] > 0 for c in curve for run in c["runs"])
    assert all(c["both"] == 1.0 for c in curve)  # SLOs no request can miss
    assert result["sweep"]["max_goodput_rate"] == 20.0 and result["sweep"]["next_missing_rate"] is None
    assert [g["scale"] for g in result["sweep"]["by_scale"]] == [0.5, 1.0, 2.0]
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
