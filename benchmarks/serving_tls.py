"""What security costs a served cluster: the same `pdserve bench` run against a plain 1P1D
cluster and against a secured one (mutual TLS on every gRPC call, the cluster secret, an
API key, KV over ZeroMQ with CURVE), alternating, on the same device.

    python benchmarks/serving_tls.py                        # GPU: 1B shape, random bf16 weights -> results/serving_tls.json
    python benchmarks/serving_tls.py --shape tiny --device cpu --num-prompts 32 --concurrency 8 \\
        --input-len 16 --output-len 16                      # CPU smoke run

Each round starts a cluster of each kind, warms it up and benchmarks it; the median
output tok/s of the rounds is reported per kind. ratio = secured / plain output tok/s
(no target: a measurement). Mean TTFT and TPOT of both are kept."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_config_folder, write_result
from pdserve.certs import write_all
from pdserve.cluster import Cluster, ClusterConfig, free_port
from pdserve.common.config import SecurityConfig


def run(folder: Path, a, secured: bool, creds: dict, work: Path, tag: str) -> dict:
    """One cluster of the kind, `pdserve bench` against it (after a warm-up)."""
    device = a.device if a.device != "cuda" else "auto"
    security = SecurityConfig(tls_cert=creds["member.pem"], tls_key=creds["member-key.pem"], tls_ca=creds["ca.pem"],
                              cluster_secret_file=creds["cluster-secret"]) if secured else SecurityConfig()
    key = Path(creds["api-key"]).read_text().strip() if secured else None
    logs = work / f"logs_{tag}"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = ClusterConfig(prefill=1, decode=1, model=str(folder), device=device, dtype=a.dtype, load_format="dummy",
                        max_num_seqs=a.concurrency, max_inflight=a.concurrency, kv_transport="zmq",
                        listen=f"127.0.0.1:{free_port()}", log_dir=str(logs), security=security, api_key=key,
                        coordinator_flags=("--max-queued", str(a.num_prompts)))
    client = (["--tls-ca", creds["ca.pem"], "--tls-cert", creds["client.pem"], "--tls-key", creds["client-key.pem"],
               "--api-key-file", creds["api-key"]] if secured else [])
    out = work / f"bench_{tag}.json"

    def bench(n: int, *save: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", cfg.listen, "--num-clients",
                               str(a.num_clients), "--num-prompts", str(n), "--max-concurrency", str(a.concurrency),
                               "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
                               "--disable-tqdm", *client, *save], capture_output=True, text=True)
    cluster = Cluster(cfg)
    try:
        cluster.start()
        bench(min(a.concurrency, a.num_prompts))
        r = bench(a.num_prompts, "--save-result", "--result-dir", str(work), "--result-filename", out.name)
        if not out.exists():
            raise RuntimeError(f"bench failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        s = json.loads(out.read_text())
    finally:
        cluster.stop()
    return dict(output_tok_s=s["output_throughput"], completed=s["completed"], failed=s["failed"],
                ttft_ms=s["mean_ttft_ms"], tpot_ms=s["mean_tpot_ms"], first_error=s["errors"][0] if s["errors"] else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--device", default="cuda", help="cuda (one GPU per node) or cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--commit", default=None, help="commit measured, where the tree has no .git")
    ap.add_argument("--out", type=Path, default=None, help="folder for the result (default: results/)")
    a = ap.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    work = Path(tempfile.mkdtemp(prefix="serving_tls_"))
    folder = write_config_folder(a.shape, work / a.shape)
    creds = {k: str(v) for k, v in write_all(work / "creds").items()}
    rows = {"plain": [], "secured": []}
    for i in range(a.rounds):
        for kind in ("plain", "secured"):
            r = run(folder, a, kind == "secured", creds, work, f"{kind}_{i}")
            rows[kind].append(r)
            print(f"round {i} {kind:8}: {r['output_tok_s']:10,.0f} output tok/s, TTFT {r['ttft_ms']:.1f} ms, "
                  f"TPOT {r['tpot_ms']:.2f} ms ({r['completed']} done, {r['failed']} failed)", flush=True)
    med = {k: statistics.median(r["output_tok_s"] for r in v) for k, v in rows.items()}
    ratio = med["secured"] / med["plain"]
    config = dict(shape=a.shape, device=a.device, dtype=a.dtype, num_prompts=a.num_prompts, input_len=a.input_len,
                  output_len=a.output_len, concurrency=a.concurrency, num_clients=a.num_clients, rounds=a.rounds,
                  topology="coordinator + 1 prefill + 1 decode, KV over zmq",
                  secured="mutual TLS, cluster secret, API key, CURVE")
    path = write_result("serving_tls", "serving_tls", ratio, None, config, commit_id=a.commit, folder=a.out,
                        runs=rows, plain_tok_s=med["plain"], secured_tok_s=med["secured"])
    print(f"secured / plain output tok/s: {ratio:.3f} -> {path} (logs in {work})")


if __name__ == "__main__":
    main()
