"""Secured clusters: mutual TLS with a cluster secret, client API keys and CURVE on the
ZeroMQ KV plane (and TLS without client certificates) keep greedy parity and the
bad-input statuses; wrong or missing credentials end UNAUTHENTICATED at every entry point
(client API, Register, Heartbeat, node APIs, KV pairing) or fail the TLS / CURVE handshake,
and leave nothing behind; members refuse to listen beyond loopback without credentials."""
from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time

import grpc
import httpx
import pytest
import zmq

from pdserve.certs import write_all
from pdserve.cluster import free_port
from pdserve.common.config import ClientConfig, SecurityConfig
from pdserve.v1 import api_pb2, api_pb2_grpc, kv_pb2, node_pb2, node_pb2_grpc
from pdserve.wire.protocol import PROTOCOL_VERSION
from pdserve.wire.security import Credentials, is_loopback
from tests.cluster_util import Client, greedy, request, start_cluster
from tests.conftest import assert_matches_reference
from tests.test_cluster import bad_requests, workload


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Our CA's files, and a second CA's (a stranger's) member certificate."""
    root = tmp_path_factory.mktemp("pki")
    ours, theirs = write_all(root / "ours"), write_all(root / "theirs")
    return {"ours": {k: str(v) for k, v in ours.items()}, "theirs": {k: str(v) for k, v in theirs.items()}}


def member_security(p: dict, **kw) -> SecurityConfig:
    return SecurityConfig(tls_cert=p["member.pem"], tls_key=p["member-key.pem"], tls_ca=p["ca.pem"],
                          cluster_secret_file=p["cluster-secret"], **kw)


def client_creds(p: dict, cert: str = "client", api_key: str | None = "file", ca: dict | None = None) -> Credentials:
    """A client of CA `ca` (default: p's) showing p's `cert` certificate and API key."""
    key = open(p["api-key"]).read().strip() if api_key == "file" else api_key
    cert_files = {"tls_cert": p[f"{cert}.pem"], "tls_key": p[f"{cert}-key.pem"]} if cert else {}
    return Credentials.client(ClientConfig(tls_ca=(ca or p)["ca.pem"], api_key=key, **cert_files))


def member_creds(p: dict, secret: bytes | None = None, cert: str = "member") -> Credentials:
    """What a member shows: p's certificate and (unless given) p's cluster secret."""
    c = Credentials.member(SecurityConfig(tls_cert=p[f"{cert}.pem"], tls_key=p[f"{cert}-key.pem"], tls_ca=p["ca.pem"],
                                          cluster_secret_file=p["cluster-secret"]))
    if secret is not None:
        c = Credentials(cert=c.cert, key=c.key, ca=c.ca, secret=secret)
    return c


def mixed_ca(p: dict, other: dict) -> Credentials:
    """Our CA to check the server, a stranger's member certificate to show it."""
    return Credentials(cert=open(other["member.pem"], "rb").read(), key=open(other["member-key.pem"], "rb").read(),
                       ca=open(p["ca.pem"], "rb").read(), secret=open(p["cluster-secret"], "rb").read().strip())


@pytest.fixture(scope="module")
def mtls(tiny_models, pki):
    """A 1P1D cluster under mutual TLS, cluster secret, API keys and CURVE, with two coordinator workers."""
    p = pki["ours"]
    cluster = start_cluster(model=tiny_models["qwen3"], kv_blocks=128, workers=2, security=member_security(p),
                            api_key=open(p["api-key"]).read().strip(), http_listen=f"127.0.0.1:{free_port()}")
    client = Client(cluster.cfg.listen, creds=client_creds(p))
    client.http = cluster.cfg.http_listen
    client.supervisor_pid = cluster.procs[0].pid
    yield client
    client.close()
    cluster.stop()


def test_the_http_api_of_a_mutual_tls_cluster_is_https_with_client_certificates_and_api_keys(mtls, pki):
    p = pki["ours"]
    url, auth = f"https://{mtls.http}/v1/completions", {"Authorization": f"Bearer {open(p['api-key']).read().strip()}"}
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with httpx.Client(verify=tls_context(p, "client"), timeout=60) as client:
        r = client.post(url, json=body, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == mtls.generate(request([5, 6, 7, 8], greedy(6, ignore_eos=True)))[
            "token_ids"]
        assert client.post(url, json=body).status_code == 401  # the gRPC API's keys, checked on HTTP too
    with pytest.raises(httpx.TransportError):  # no client certificate under mutual TLS: the handshake fails
        httpx.post(url, json=body, headers=auth, verify=tls_context(p), timeout=30)
    with pytest.raises(httpx.TransportError):  # a certificate of another CA
        httpx.post(url, json=body, headers=auth, verify=tls_context(p, "client", pki["theirs"]), timeout=30)
    mtls.wait_blocks_at_baseline()


def tls_context(p: dict, cert: str = "", of: dict | None = None) -> ssl.SSLContext:
    """An HTTPS client's context: p's CA, and `cert`'s certificate (of `of`'s CA, default p's) if given."""
    ctx = ssl.create_default_context(cafile=p["ca.pem"])
    if cert:
        ctx.load_cert_chain((of or p)[f"{cert}.pem"], (of or p)[f"{cert}-key.pem"])
    return ctx


def test_the_http_api_beyond_loopback_needs_an_api_key():
    with pytest.raises(ValueError, match="API key"):
        Credentials().check_http_listen("0.0.0.0:8000")
    Credentials(api_keys=frozenset({"k"})).check_http_listen("0.0.0.0:8000")
    Credentials().check_http_listen("127.0.0.1:8000")
    Credentials(insecure=True).check_http_listen("0.0.0.0:8000")  # said in the log


def nodes_by_role(client: Client) -> dict[str, dict]:
    return {n["role"]: n for n in client.status()["nodes"]}


def test_a_mutual_tls_cluster_with_curve_matches_transformers(mtls, tiny_models, reference):
    jobs = workload(26, 8)
    outs = mtls.generate_all(jobs)
    ref = reference(tiny_models["qwen3"])
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "mTLS + CURVE")
    mtls.wait_blocks_at_baseline()


def test_bad_inputs_get_invalid_argument_under_mutual_tls(mtls):
    for req, message in bad_requests()[::3]:
        with pytest.raises(grpc.RpcError) as e:
            mtls.generate(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, e.value.details())
        assert message in e.value.details()
    mtls.wait_blocks_at_baseline()


def test_clients_without_a_valid_api_key_are_unauthenticated(mtls, pki):
    p = pki["ours"]
    for creds, why in [(client_creds(p, api_key=None), "missing API key"),
                       (client_creds(p, api_key="not-the-key"), "invalid API key"),
                       (client_creds(p, cert="member", api_key=None), "missing API key")]:
        bad = Client(mtls.address, creds=creds)
        try:
            for call in (lambda: bad.generate(request([1, 2, 3], greedy(4))), bad.status):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in e.value.details()
        finally:
            bad.close()
    nodes = mtls.wait_blocks_at_baseline()
    assert len(nodes) == 2 and mtls.status()["workers"] and all(w["inflight"] == 0 for w in mtls.status()["workers"])


def test_a_client_certificate_of_another_ca_fails_the_handshake(mtls, pki):
    bad = Client(mtls.address, creds=client_creds(pki["theirs"], ca=pki["ours"]))
    try:
        with pytest.raises(grpc.RpcError) as e:
            bad.generate(request([1, 2, 3], greedy(4)), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # refused in the TLS handshake: no call at all
    finally:
        bad.close()


def register_request(role=api_pb2.ROLE_DECODE) -> node_pb2.RegisterRequest:
    return node_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, role=role, address="127.0.0.1:9",
                                    kv_endpoint="tcp://127.0.0.1:9", tp=1, kv_blocks_total=8)


def test_register_and_heartbeat_need_the_secret_and_a_member_certificate(mtls, pki):
    p = pki["ours"]
    before = {n["id"] for n in mtls.status()["nodes"]}
    cases = [(member_creds(p, secret=b"wrong"), "wrong cluster join secret"),
             (member_creds(p, secret=b""), "needs the cluster join secret"),
             (Credentials(cert=open(p["client.pem"], "rb").read(), key=open(p["client-key.pem"], "rb").read(),
                          ca=open(p["ca.pem"], "rb").read(), secret=open(p["cluster-secret"], "rb").read().strip()),
              "cluster member's certificate")]
    for creds, why in cases:
        with creds.sync_channel(mtls.address) as ch:
            stub = node_pb2_grpc.CoordinatorStub(ch)
            for call, req in ((stub.Register, register_request()),
                              (stub.Heartbeat, node_pb2.HeartbeatRequest(node_id=next(iter(before)), epoch=1))):
                with pytest.raises(grpc.RpcError) as e:
                    call(req, timeout=5, metadata=creds.metadata())
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (why, e.value.details())
                assert why in e.value.details()
    with mixed_ca(p, pki["theirs"]).sync_channel(mtls.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            node_pb2_grpc.CoordinatorStub(ch).Register(register_request(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert {n["id"] for n in mtls.status()["nodes"]} == before
    assert all(n["healthy"] for n in mtls.status()["nodes"])


def test_node_apis_and_kv_pairing_refuse_callers_outside_the_cluster(mtls, pki):
    p = pki["ours"]
    decode = nodes_by_role(mtls)["decode"]
    reserve = node_pb2.ReserveRequest(request_id="intruder", prompt_token_ids=[1, 2, 3],
                                      sampling=greedy(4), lease_s=30.0)
    pairs = node_pb2.KVPairsRequest(protocol_version=PROTOCOL_VERSION, prefill_node_id="not-a-peer",
                                    prefill_tp=1, pair_set="x", kv_transport="nccl")
    wrong = member_creds(p, secret=b"wrong")
    with wrong.sync_channel(decode["address"]) as ch:
        for call, req in ((node_pb2_grpc.DecodeNodeStub(ch).Reserve, reserve),
                          (node_pb2_grpc.DecodeNodeStub(ch).OpenKVPairs, pairs)):
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=5, metadata=wrong.metadata())
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    right = member_creds(p)
    with right.sync_channel(decode["address"]) as ch:  # the secret, but no prefill peer of this node
        with pytest.raises(grpc.RpcError) as e:
            node_pb2_grpc.DecodeNodeStub(ch).OpenKVPairs(pairs, timeout=10, metadata=right.metadata())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "not a registered peer" in e.value.details()
    mtls.wait_blocks_at_baseline()


def test_the_supervisors_loopback_port_takes_only_its_workers(mtls, pki):
    children = open(f"/proc/{mtls.supervisor_pid}/task/{mtls.supervisor_pid}/children").read().split()
    argv = open(f"/proc/{children[0]}/cmdline").read().split("\0")
    internal = argv[argv.index("--worker-of") + 1]
    secret = open(pki["ours"]["cluster-secret"], "rb").read().strip()
    for creds in (Credentials(), Credentials(secret=secret)):
        with creds.sync_channel(internal) as ch:  # no token, or the cluster secret: neither is the run's token
            with pytest.raises(grpc.RpcError) as e:
                node_pb2_grpc.CoordinatorStub(ch).Register(register_request(), timeout=5, metadata=creds.metadata())
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(mtls.status()["nodes"]) == 2


def handshake(endpoint: str, keys: tuple[bytes, bytes] | None, server_key: bytes | None, timeout_s: float = 5.0):
    """Connect a DEALER (CURVE client with keys, or plain), send a KV header; the monitor
    events seen and whether any answer came back."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys[0], keys[1], server_key
    monitor = sock.get_monitor_socket()
    sock.connect(endpoint)
    header = kv_pb2.KVHeader(protocol_version=PROTOCOL_VERSION, transfer_id="intruder", last=True)
    sock.send_multipart([header.SerializeToString()])
    events, deadline = set(), time.monotonic() + timeout_s
    from zmq.utils.monitor import recv_monitor_message
    while time.monotonic() < deadline and not events & {zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                                                       zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                                       zmq.EVENT_HANDSHAKE_SUCCEEDED}:
        if monitor.poll(100):
            events.add(recv_monitor_message(monitor)["event"])
    answered = bool(sock.poll(500))
    sock.disable_monitor()
    monitor.close()
    sock.close()
    ctx.term()
    return events, answered


def test_kv_connections_with_an_unlisted_curve_key_or_without_curve_fail_the_handshake(mtls, pki):
    p = pki["ours"]
    decode = nodes_by_role(mtls)["decode"]
    creds = member_creds(p)
    with creds.sync_channel(decode["address"]) as ch:  # a ticket tells the decode node's KV endpoint and key
        stub = node_pb2_grpc.DecodeNodeStub(ch)
        ticket = stub.Reserve(node_pb2.ReserveRequest(request_id="probe", prompt_token_ids=[1, 2, 3],
                                                      sampling=greedy(4), lease_s=30.0, epoch=0),
                              timeout=5, metadata=creds.metadata())
        try:
            assert ticket.kv_curve_key and ticket.kv_endpoint.startswith("tcp://")
            events, answered = handshake(ticket.kv_endpoint, zmq.curve_keypair(), ticket.kv_curve_key.encode())
            assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in events and not answered, events
            events, answered = handshake(ticket.kv_endpoint, None, None, timeout_s=2.0)
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events and not answered, events
        finally:
            stub.Abort(node_pb2.AbortRequest(request_id="probe"), timeout=5, metadata=creds.metadata())
    mtls.wait_blocks_at_baseline()
    outs = mtls.generate_all(workload(3, 2))  # the real prefill peer still gets through
    assert all(o["token_ids"] for o in outs)


def test_a_tls_cluster_without_client_certificates_matches_transformers(tiny_models, reference, pki):
    p = pki["ours"]
    model = tiny_models["llama"]
    cluster = start_cluster(model=model, kv_blocks=128, security=member_security(p, tls_client_auth=False))
    client = Client(cluster.cfg.listen, creds=client_creds(p, cert="", api_key=None))
    try:
        jobs = workload(7, 4)
        outs = client.generate_all(jobs)
        client.wait_blocks_at_baseline()
        with pytest.raises(grpc.RpcError) as e:  # TLS alone: the secret is what a member shows
            with client_creds(p, cert="", api_key=None).sync_channel(cluster.cfg.listen) as ch:
                node_pb2_grpc.CoordinatorStub(ch).Register(register_request(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        client.close()
        cluster.stop()
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], reference(model).generate(prompt, n), "TLS")


@pytest.mark.parametrize("transport", ["nccl", "cuda-ipc"])
def test_secured_nccl_and_cuda_ipc_clusters_pair_and_match_transformers(tiny_models, reference, pki, transport,
                                                                        tmp_path):
    """Pairs open for the listed prefill peer (OpenKVPairs checked), the control sockets use CURVE."""
    p = pki["ours"]
    model = tiny_models["qwen2"]
    cluster = start_cluster(model=model, kv_blocks=64, kv_transport=transport, security=member_security(p),
                            log_dir=str(tmp_path))
    client = Client(cluster.cfg.listen, creds=client_creds(p, api_key=None))
    try:
        jobs = workload(5, 3)
        outs = client.generate_all(jobs)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], reference(model).generate(prompt, n), transport)


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, timeout=timeout)


def test_members_refuse_to_listen_beyond_loopback_without_credentials(tmp_path, pki):
    out = run_cli("coordinator", "--listen", "0.0.0.0:0", "--workers", "1")
    assert out.returncode == 2 and "--insecure" in out.stderr, out.stderr[-2000:]
    out = run_cli("prefill", "--coordinator", "127.0.0.1:9", "--listen", "0.0.0.0:0", "--model", str(tmp_path))
    assert out.returncode != 0 and "neither TLS" in out.stderr, out.stderr[-2000:]
    out = run_cli("decode", "--coordinator", "127.0.0.1:9", "--kv-host", "0.0.0.0", "--model", str(tmp_path))
    assert out.returncode != 0 and "KV plane" in out.stderr, out.stderr[-2000:]
    # with credentials, or --insecure, the coordinator starts
    for extra in (["--insecure"], ["--cluster-secret-file", pki["ours"]["cluster-secret"]]):
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "coordinator", "--listen", "0.0.0.0:0",
                                 "--workers", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        try:
            assert proc.stdout.readline().startswith("ready"), extra
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0


def test_loopback_addresses():
    assert is_loopback("127.0.0.1:1") and is_loopback("[::1]:5") and is_loopback("localhost:80")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("[::]:1") and not is_loopback("10.1.2.3:4")


def test_pdserve_certs_writes_private_files_and_keeps_existing_ones(tmp_path):
    out = run_cli("certs", "--out", str(tmp_path / "c"), "--host", "10.0.0.7", "--host", "coord.example")
    assert out.returncode == 0, out.stderr
    assert oct(os.stat(tmp_path / "c" / "member-key.pem").st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "c" / "cluster-secret").st_mode & 0o777) == "0o600"
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "member.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.example" in names.get_values_for_type(x509.DNSName)
    assert "pdserve://member" in names.get_values_for_type(x509.UniformResourceIdentifier)
    again = run_cli("certs", "--out", str(tmp_path / "c"))
    assert again.returncode == 2 and "--force" in again.stderr
