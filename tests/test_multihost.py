"""Several hosts on one machine: the coordinator, a prefill node and a decode node each in
a Linux network namespace of its own, joined by veth pairs on a bridge (a fourth
namespace), each with its own address. Everything runs secured: mutual TLS, the cluster
secret, an API key, KV over ZeroMQ with CURVE. Checked: greedy parity, a node with the
wrong credentials is rejected, a link cut (`ip link set down`) in the middle of a stream
ends it UNAVAILABLE and the decode node comes back with every block free, a node killed
in its namespace ends its streams UNAVAILABLE. Skipped where namespaces cannot be made."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pdserve.certs import write_all
from tests.conftest import assert_matches_reference
from tests.test_cluster import workload

NET = f"10.213.{os.getpid() % 250}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _can_make_namespaces() -> str:
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"pdprobe{os.getpid()}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return ""


WHY_NOT = _can_make_namespaces()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "namespaces available")


class Hosts:
    """Namespaces `hub` (a bridge) and one per member, each member at NET.<i> on eth0."""

    def __init__(self, members: list[str]):
        tag = os.getpid()
        self.hub = f"pd{tag}hub"
        self.ns = {m: f"pd{tag}{m}" for m in members}
        self.addr = {m: f"{NET}.{i + 1}" for i, m in enumerate(members)}

    def up(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, (m, ns) in enumerate(self.ns.items()):
            _ip("netns", "add", ns)
            _ip("-n", self.hub, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[m]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for ns in [*self.ns.values(), self.hub]:
            _ip("netns", "del", ns, check=False)

    def link(self, member: str, state: str) -> None:
        _ip("-n", self.ns[member], "link", "set", "eth0", state)

    def popen(self, member: str, args: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[member], sys.executable, *args], **kw)


class SecuredCluster:
    def __init__(self, hosts: Hosts, pki: dict, model: str, log_dir):
        self.hosts, self.pki, self.model, self.log_dir = hosts, pki, model, log_dir
        self.coordinator = f"{hosts.addr['coord']}:50051"
        self.procs: dict[str, subprocess.Popen] = {}

    def member_flags(self, pki: dict | None = None) -> list[str]:
        p = pki or self.pki
        return ["--tls-cert", p["member.pem"], "--tls-key", p["member-key.pem"], "--tls-ca", p["ca.pem"],
                "--cluster-secret-file", p["cluster-secret"]]

    def client_flags(self) -> list[str]:
        p = self.pki
        return ["--tls-cert", p["client.pem"], "--tls-key", p["client-key.pem"], "--tls-ca", p["ca.pem"],
                "--api-key-file", p["api-key"]]

    def start(self, name: str, member: str, args: list[str], pki: dict | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = self.hosts.popen(member, ["-m", "pdserve", *args, *self.member_flags(pki)], stdout=subprocess.DEVNULL,
                                stderr=log)
        log.close()
        self.procs[name] = proc
        return proc

    def start_node(self, name: str, role: str, member: str, pki: dict | None = None) -> subprocess.Popen:
        host = self.hosts.addr[member]
        return self.start(name, member, [role, "--coordinator", self.coordinator, "--model", self.model,
                                         "--device", "cpu", "--kv-blocks", "128", "--listen", f"{host}:0",
                                         "--kv-transport", "zmq", "--kv-host", host], pki)

    def client(self, command: str, jobs=None, **kw) -> subprocess.Popen:
        args = ["-m", "tests.netns_client", command, "--coordinator", self.coordinator, *self.client_flags()]
        if jobs is not None:
            args += ["--jobs", json.dumps(jobs)]
        return self.hosts.popen("coord", args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kw)

    def status(self) -> dict | None:
        out, _ = self.client("status").communicate(timeout=30)
        return json.loads(out) if out.strip() else None

    def wait(self, ok, what: str, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None and n in ("coord", "prefill", "decode")]
            assert not dead, f"{dead} exited; logs in {self.log_dir}"
            s = self.status()
            if s is not None and ok(s):
                return s
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; last status {s}; logs in {self.log_dir}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def healthy_roles(s: dict) -> list[str]:
    return sorted(n["role"] for n in s["nodes"] if n["healthy"])


def at_baseline(s: dict) -> bool:
    return healthy_roles(s) == ["decode", "prefill"] and all(
        n["kv_blocks_free"] == n["kv_blocks_total"] and n["running"] == 0 for n in s["nodes"] if n["healthy"])


def stream(cluster: SecuredCluster, jobs) -> subprocess.Popen:
    return cluster.client("generate", jobs)


def results(proc: subprocess.Popen, timeout: float = 120.0) -> list[dict]:
    out, _ = proc.communicate(timeout=timeout)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wait_tokens(proc: subprocess.Popen, n: int) -> None:
    """Read `token k` lines until k >= n."""
    while True:
        line = proc.stdout.readline()
        assert line, "the stream ended before the cut"
        if line.startswith("token") and int(line.split()[1]) >= n:
            return


def test_a_secured_cluster_across_network_namespaces(tiny_models, reference, tmp_path):
    hosts = Hosts(["coord", "prefill", "decode", "rogue"])
    pki = {k: str(v) for k, v in write_all(tmp_path / "pki", hosts=list(hosts.addr.values())).items()}
    other = {k: str(v) for k, v in write_all(tmp_path / "other", hosts=list(hosts.addr.values())).items()}
    model = tiny_models["qwen3"]
    cluster = SecuredCluster(hosts, pki, model, tmp_path)
    hosts.up()
    try:
        cluster.start("coord", "coord", ["coordinator", "--listen", cluster.coordinator, "--workers", "1",
                                         "--model", model, "--api-key-file", pki["api-key"]])
        cluster.start_node("decode", "decode", "decode")
        cluster.start_node("prefill", "prefill", "prefill")
        cluster.wait(at_baseline, "the cluster")

        # parity across hosts, KV over CURVE
        jobs = workload(11, 4)
        outs = results(stream(cluster, jobs))
        ref = reference(model)
        assert [o["code"] for o in outs] == ["OK"] * len(jobs), outs
        for (prompt, n), out in zip(jobs, outs):
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "across namespaces")

        # a node of another CA, and one with our certificate but the wrong secret, cannot join
        rogue = cluster.start_node("rogue", "prefill", "rogue", pki=other)
        wrong = dict(pki, **{"cluster-secret": str(tmp_path / "wrong-secret")})
        (tmp_path / "wrong-secret").write_text("not-the-secret\n")
        rogue2 = cluster.start_node("rogue2", "prefill", "rogue", pki=wrong)
        assert rogue.wait(timeout=120) != 0 and rogue2.wait(timeout=120) != 0
        assert "UNAUTHENTICATED" in (tmp_path / "rogue2.log").read_text()
        assert healthy_roles(cluster.status()) == ["decode", "prefill"] and len(cluster.status()["nodes"]) == 2

        # the decode node's link cut mid-stream: UNAVAILABLE, and once the link is back every block is free
        long = stream(cluster, [[[1, 2, 3, 4], 480]])
        wait_tokens(long, 10)
        hosts.link("decode", "down")
        try:
            out = results(long, timeout=60)
        finally:
            hosts.link("decode", "up")
        assert out and out[0]["code"] == "UNAVAILABLE" and 10 <= len(out[0]["token_ids"]) < 480, out
        cluster.wait(at_baseline, "the decode node back with every block free", timeout=120)
        again = results(stream(cluster, jobs[:1]))
        assert_matches_reference(again[0]["token_ids"], ref.generate(*jobs[0]), "after the cut")

        # the decode node killed in its namespace mid-stream: UNAVAILABLE (no other decode node)
        long = stream(cluster, [[[5, 6, 7], 480]])
        wait_tokens(long, 10)
        cluster.procs.pop("decode").kill()
        out = results(long, timeout=60)
        assert out and out[0]["code"] == "UNAVAILABLE", out
        s = cluster.wait(lambda s: healthy_roles(s) == ["prefill"], "the decode node gone")
        prefill = next(n for n in s["nodes"] if n["role"] == "prefill")
        assert prefill["kv_blocks_free"] == prefill["kv_blocks_total"]
    finally:
        cluster.stop()
        hosts.down()
