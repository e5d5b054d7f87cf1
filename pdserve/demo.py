"""`make demo`: a local 1 prefill + 1 decode cluster with the default model on CPU,
one streamed chat answer with TTFT and TPOT, then a clean shutdown."""
from __future__ import annotations

import sys
import tempfile
import time

from pdserve.common.sampling import SamplingParams
from pdserve.client import build_request, generate
from pdserve.cluster import Cluster, ClusterConfig, free_port

PROMPT = "Explain in two sentences why the sky is blue."


def main() -> int:
    port = free_port()
    logs = tempfile.mkdtemp(prefix="pdserve-demo-")
    cluster = Cluster(ClusterConfig(listen=f"127.0.0.1:{port}", device="cpu", kv_blocks=512, log_dir=logs))
    t0 = time.monotonic()
    print("starting coordinator, 1 prefill node and 1 decode node (SmolLM2-135M-Instruct, CPU) ...", flush=True)
    try:
        cluster.start()
        print(f"cluster ready in {time.monotonic() - t0:.1f} s at 127.0.0.1:{port}\n", flush=True)
        print(f"> {PROMPT}\n", flush=True)
        req = build_request(PROMPT, None, True, SamplingParams(max_tokens=96, temperature=0.0))
        return generate(cluster.cfg.listen, req, as_json=False, timeout=300)
    finally:
        cluster.stop()
        print(f"cluster stopped (logs in {logs})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
