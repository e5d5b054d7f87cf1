#!/usr/bin/env bash
# Every GPU measurement and GPU test, by group, in one command (run on a GPU host
# from the repository root):
#
#   bash benchmarks/gpu_suite.sh [--commit HASH] GROUP...
#
# Groups: tests-engine (tests/gpu kernels, engine and bf16 parity), prefill-graphs
# (their tests and benchmarks/prefill_probe.py, one GPU), engine-1b
# (decode-1b and throughput-1b: decode_latency and engine_throughput on the
# Llama-3.2-1B shape), engine-8b (decode-8b and throughput-8b: both on the
# Llama-3.1-8B shape at TP 1 and TP 2), goodput (goodput-prefill and goodput-decode:
# each workload, 1P1D against 2 colocated), nccl (nccl-bench: the NCCL KV transfer
# benchmarks; nccl-tests: tests/gpu fused KV kernels, transport and cluster tests; the
# 1:2 and 2:1 cluster tests need three GPUs), serving-overhead (served against offline, one
# GPU), relay (the coordinator relay over worker counts, synthetic nodes, CPU only), ipc
# (ipc-tests: tests/gpu/test_gpu_ipc_kernels.py and test_gpu_ipc.py; ipc-bench: kv_ipc.py, kv_exposed.py --transport
# cuda-ipc and serving_1p1d.py, on GPU 0).
# A group (or part of one) that needs more GPUs than the host has says so
# ("CANNOT RUN") and makes the suite exit non-zero.
# Result JSONs land in benchmarks/results/ and, where $OUT is set, are copied there.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's pdserve, installed or not
commit=()
if [ "${1:-}" = "--commit" ]; then commit=(--commit "$2"); shift 2; fi
export PYTHONUNBUFFERED=1
out=${OUT:-}
status=0
run() {  # run NAME TIMEOUT CMD...: one step, its log kept, its failure remembered
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*"
    local t=$SECONDS
    if [ -n "$out" ]; then timeout "$limit" "$@" 2>&1 | tee -a "$out/suite.log"; rc=${PIPESTATUS[0]}
    else timeout "$limit" "$@"; rc=$?; fi
    echo "=== $name: exit $rc in $((SECONDS - t)) s"
    [ "$rc" = 0 ] || status=1
}
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
need() {  # need N NAME: true where N GPUs are here; else says the step cannot run and fails the suite
    [ "$gpus" -ge "$1" ] && return 0
    echo "=== $2: CANNOT RUN: needs $1 GPUs, $gpus here"
    status=1
    return 1
}
for group in "$@"; do
    case $group in
        tests-engine)
            need 1 tests-engine || continue
            run tests-kernels 120 python3 -m pytest -q -s tests/gpu/test_gpu_kernels.py
            run tests-engine 300 python3 -m pytest -q -s tests/gpu/test_gpu_engine.py tests/gpu/test_gpu_bf16.py ;;
        engine-1b) "$0" ${commit[@]+"${commit[@]}"} decode-1b throughput-1b || status=1 ;;
        engine-8b) "$0" ${commit[@]+"${commit[@]}"} decode-8b throughput-8b || status=1 ;;
        decode-1b)
            need 1 decode-1b && run decode-1b 150 python3 benchmarks/decode_latency.py "${commit[@]}" ${out:+--profile "$out/profile_1b.txt"} ;;
        throughput-1b)
            need 1 throughput-1b && run throughput-1b 300 python3 benchmarks/engine_throughput.py "${commit[@]}" ;;
        decode-8b)
            need 1 decode-8b-tp1 && run decode-8b-tp1 150 python3 benchmarks/decode_latency.py --shape llama-3.1-8b --tp 1 "${commit[@]}"
            need 2 decode-8b-tp2 && run decode-8b-tp2 150 python3 benchmarks/decode_latency.py --shape llama-3.1-8b --tp 2 "${commit[@]}" ;;
        throughput-8b)
            need 2 throughput-8b && run throughput-8b 400 python3 benchmarks/engine_throughput.py --shape llama-3.1-8b --tp 1 2 \
                --output-len 128 "${commit[@]}" ;;
        goodput) "$0" ${commit[@]+"${commit[@]}"} goodput-prefill goodput-decode || status=1 ;;
        goodput-prefill)  # each about 6 min with 10 s of arrivals per rate: one device call each
            need 2 goodput-prefill && run goodput-prefill 580 python3 benchmarks/goodput.py --workload prefill-heavy --device cuda "${commit[@]}" ;;
        goodput-decode)
            need 2 goodput-decode && run goodput-decode 580 python3 benchmarks/goodput.py --workload decode-heavy --device cuda "${commit[@]}" ;;
        prefill-graphs)  # about 3 min on one GPU: the prefill graphs' tests, then eager against graph steps
            need 1 prefill-graphs || continue
            run tests-prefill-graphs 300 python3 -m pytest -q -s tests/gpu/test_gpu_prefill_graphs.py
            run prefill-probe 300 python3 benchmarks/prefill_probe.py --procs 4 --steps 20 "${commit[@]}" ;;
        nccl) "$0" ${commit[@]+"${commit[@]}"} nccl-bench nccl-tests || status=1 ;;
        nccl-bench)  # about 4 min
            need 2 nccl-bench || continue
            run kv-nccl 150 python3 benchmarks/kv_nccl.py --diag "${commit[@]}"
            run kv-exposed 300 python3 benchmarks/kv_exposed.py --requests 60 "${commit[@]}" ;;
        nccl-tests)  # about 4 min; the 1:2 and 2:1 cluster tests need three GPUs
            need 2 nccl-tests || continue
            need 3 "nccl-tests (the 1:2 and 2:1 cluster tests; the rest runs)"
            run tests-kv-kernels 120 python3 -m pytest -q tests/gpu/test_gpu_kv_kernels.py
            run tests-nccl 420 python3 -m pytest -q -s tests/gpu/test_gpu_nccl_rank.py tests/gpu/test_gpu_cluster.py ;;
        serving-overhead)  # one GPU: offline and served at 256 and 1024 streams
            need 1 serving-overhead && run serving-overhead 580 python3 benchmarks/serving_overhead.py "${commit[@]}" ;;
        relay)  # no GPU needed: the coordinator's relay over 1 2 4 8 workers with synthetic nodes
            run relay 580 python3 benchmarks/relay.py "${commit[@]}" ;;
        ipc) "$0" ${commit[@]+"${commit[@]}"} ipc-tests ipc-bench || status=1 ;;
        ipc-tests)  # one GPU
            need 1 ipc-tests && run tests-ipc 420 python3 -m pytest -q -s tests/gpu/test_gpu_ipc_kernels.py tests/gpu/test_gpu_ipc.py ;;
        ipc-bench)  # one GPU: both nodes of 1P1D on GPU 0
            need 1 ipc-bench || continue
            run kv-ipc 150 python3 benchmarks/kv_ipc.py "${commit[@]}"
            run kv-exposed-ipc 400 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/kv_exposed.py --transport cuda-ipc \
                --skip-zmq "${commit[@]}"
            run serving-1p1d 580 python3 benchmarks/serving_1p1d.py --gpu 0 "${commit[@]}" ;;
        *) echo "unknown group $group"; status=1 ;;
    esac
done
if [ -n "$out" ]; then
    tar czf "$out/results.tgz" benchmarks/results  # one file: few files come back from a device run
fi
exit $status
