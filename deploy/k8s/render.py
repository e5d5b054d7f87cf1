"""Render pdserve's Kubernetes manifests from values.yaml (no Helm needed; plain YAML out).

    python deploy/k8s/render.py > pdserve.yaml                    # the defaults (deploy/k8s/pdserve.yaml)
    python deploy/k8s/render.py --set prefill.replicas=2 --set decode.tp=2 | kubectl apply -f -
    python deploy/k8s/render.py --credentials DIR --only-secret | kubectl apply -f -   # files of `pdserve certs`

Objects: the coordinator (Deployment of one pod, its workers inside, and a Service), a
prefill and a decode pool (a Deployment each: one pod per node, one GPU per TP rank, the
ranks being processes of the pod), readiness from the standard gRPC health service, and
the credentials Secret (only with --credentials). Role labels follow llm-d
(`llm-d.ai/role: prefill|decode`) besides the app.kubernetes.io ones."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SECRET_FILES = ("ca.pem", "member.pem", "member-key.pem", "cluster-secret", "api-key")
CREDS = "/etc/pdserve"


def load_values(path: str | Path = HERE / "values.yaml", sets: list[str] = ()) -> dict:
    values = yaml.safe_load(Path(path).read_text())
    for item in sets:
        key, _, raw = item.partition("=")
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return values


def labels(v: dict, component: str) -> dict:
    out = {"app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": v["name"],
           "app.kubernetes.io/component": component}
    if component in ("prefill", "decode"):
        out["llm-d.ai/role"] = component
    return out


def member_flags(v: dict) -> list[str]:
    if not v["tls"]["enabled"]:
        return ["--insecure"]
    return ["--tls-cert", f"{CREDS}/member.pem", "--tls-key", f"{CREDS}/member-key.pem", "--tls-ca", f"{CREDS}/ca.pem",
            "--tls-server-name", v["tls"]["serverName"], "--cluster-secret-file", f"{CREDS}/cluster-secret"]


def probe(v: dict, address: str, port: int) -> dict:
    """Readiness from the gRPC health service: Kubernetes' own gRPC probe where the port is
    plain, `pdserve health` (which speaks TLS) where it is not."""
    if not v["tls"]["enabled"]:
        return {"grpc": {"port": port}, "periodSeconds": 5, "failureThreshold": 3}
    flags = " ".join(f for f in member_flags(v) if not f.endswith("cluster-secret") and f != "--cluster-secret-file")
    return {"exec": {"command": ["sh", "-c", f"pdserve health --address {address} {flags}"]},
            "periodSeconds": 5, "timeoutSeconds": 4, "failureThreshold": 3}


def volumes(v: dict, models: bool) -> tuple[list[dict], list[dict]]:
    vols, mounts = [], []
    if models:
        vols.append({"name": "models", "persistentVolumeClaim": {"claimName": v["modelVolume"]["claimName"],
                                                                 "readOnly": True}})
        mounts.append({"name": "models", "mountPath": "/models", "readOnly": True})
        vols.append({"name": "shm", "emptyDir": {"medium": "Memory"}})  # NCCL and torch use /dev/shm
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    if v["tls"]["enabled"]:
        vols.append({"name": "credentials", "secret": {"secretName": v["tls"]["secretName"], "defaultMode": 0o440}})
        mounts.append({"name": "credentials", "mountPath": CREDS, "readOnly": True})
    return vols, mounts


def pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001}


def deployment(v: dict, component: str, replicas: int, container: dict, vols: list[dict]) -> dict:
    lab = labels(v, component)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"{v['name']}-{component}", "labels": lab},
            "spec": {"replicas": replicas, "selector": {"matchLabels": lab},
                     "template": {"metadata": {"labels": lab},
                                  "spec": {"securityContext": pod_security(), "containers": [container],
                                           "volumes": vols, "terminationGracePeriodSeconds": 60}}}}


def coordinator(v: dict) -> list[dict]:
    c, port = v["coordinator"], v["coordinator"]["port"]
    vols, mounts = volumes(v, models=True)
    args = ["coordinator", "--listen", f"0.0.0.0:{port}", "--model", v["model"], "--workers", str(c["workers"]),
            *member_flags(v)]
    if v["tls"]["enabled"]:
        args += ["--api-key-file", f"{CREDS}/api-key"]
    container = {"name": "coordinator", "image": v["coordinatorImage"], "args": args + list(v["extraCoordinatorArgs"]),
                 "ports": [{"name": "grpc", "containerPort": port}], "volumeMounts": mounts,
                 "readinessProbe": probe(v, f"127.0.0.1:{port}", port),
                 "livenessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 10, "failureThreshold": 6},
                 "resources": c["resources"]}
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": f"{v['name']}-coordinator", "labels": labels(v, "coordinator")},
               "spec": {"type": c["serviceType"], "selector": labels(v, "coordinator"),
                        "ports": [{"name": "grpc", "port": port, "targetPort": "grpc", "appProtocol": "grpc"}]}}
    return [deployment(v, "coordinator", 1, container, vols), service]


def pool(v: dict, role: str) -> dict:
    p, port = v[role], v["nodePort"]
    vols, mounts = volumes(v, models=True)
    args = [role, "--coordinator", f"{v['name']}-coordinator:{v['coordinator']['port']}", "--model", v["model"],
            "--device", v["device"], "--tp", str(p["tp"]), "--listen", f"$(POD_IP):{port}",
            "--kv-transport", v["kvTransport"], "--kv-host", "$(POD_IP)", *member_flags(v), *v["extraNodeArgs"]]
    resources = {k: dict(val) for k, val in p["resources"].items()}
    if v["device"] == "cuda":
        resources.setdefault("limits", {})["nvidia.com/gpu"] = p["tp"]
    container = {"name": role, "image": v["image"], "args": args,
                 "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                 "ports": [{"name": "grpc", "containerPort": port}], "volumeMounts": mounts,
                 "readinessProbe": probe(v, f"$POD_IP:{port}", port),
                 "startupProbe": {"tcpSocket": {"port": port}, "periodSeconds": 5, "failureThreshold": 120},
                 "resources": resources}
    return deployment(v, role, p["replicas"], container, vols)


def secret(v: dict, folder: str) -> dict:
    data = {name: (Path(folder) / name).read_text() for name in SECRET_FILES}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": v["tls"]["secretName"], "labels": labels(v, "credentials")}, "stringData": data}


def render(v: dict, credentials: str | None = None, only_secret: bool = False) -> list[dict]:
    docs = [secret(v, credentials)] if credentials else []
    if not only_secret:
        docs += [*coordinator(v), pool(v, "prefill"), pool(v, "decode")]
    return docs


class _Plain(yaml.SafeDumper):
    """No anchors and aliases: every object reads on its own."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump(docs: list[dict]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Plain, sort_keys=False) for d in docs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--values", default=str(HERE / "values.yaml"))
    ap.add_argument("--set", action="append", default=[], help="KEY.PATH=YAML-VALUE over the values (repeatable)")
    ap.add_argument("--credentials", default=None, help="a `pdserve certs` folder: add the Secret with its files")
    ap.add_argument("--only-secret", action="store_true", help="with --credentials: the Secret alone")
    a = ap.parse_args(argv)
    sys.stdout.write(dump(render(load_values(a.values, a.set), a.credentials, a.only_secret)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
