"""deploy/: the Kubernetes manifests render from values.yaml, pass the Kubernetes schemas
offline (kubernetes-validate bundles them; strict: no unknown fields) in every variant,
size the pools from the values, and the committed pdserve.yaml is what the defaults render."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.33.0"   # a release clusters still run; the schemas ship with the package


def render_module():
    spec = importlib.util.spec_from_file_location("pdserve_k8s_render", K8S / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def validate(docs: list[dict]) -> None:
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)  # raises ValidationError with the path


def by_name(docs: list[dict]) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_the_committed_manifests_are_the_rendered_defaults_and_pass_the_schemas():
    render = render_module()
    text = render.dump(render.render(render.load_values()))
    assert (K8S / "pdserve.yaml").read_text() == text, "run: python deploy/k8s/render.py > deploy/k8s/pdserve.yaml"
    validate(list(yaml.safe_load_all(text)))


@pytest.mark.parametrize("sets", [[], ["tls.enabled=false", "device=cpu"], ["kvTransport=nccl", "prefill.tp=2"]])
def test_every_variant_passes_the_schemas_and_sizes_the_pools_from_the_values(sets, tmp_path):
    from pdserve.certs import write_all
    render = render_module()
    values = render.load_values(sets=[*sets, "prefill.replicas=3", "decode.replicas=2", "decode.tp=4"])
    write_all(tmp_path)
    docs = render.render(values, credentials=str(tmp_path))
    validate(docs)
    objs = by_name(docs)
    prefill, decode = objs["Deployment/pdserve-prefill"], objs["Deployment/pdserve-decode"]
    assert prefill["spec"]["replicas"] == 3 and decode["spec"]["replicas"] == 2
    for pool, role in ((prefill, "prefill"), (decode, "decode")):
        pod = pool["spec"]["template"]
        assert pod["metadata"]["labels"]["llm-d.ai/role"] == role
        container = pod["spec"]["containers"][0]
        assert container["args"][0] == role and "readinessProbe" in container
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (values[role]["tp"] if values["device"] == "cuda" else None)
        args = container["args"]
        if values["tls"]["enabled"]:
            assert "--tls-ca" in args and "--cluster-secret-file" in args and "exec" in container["readinessProbe"]
        else:
            assert "--insecure" in args and "grpc" in container["readinessProbe"]
    assert set(objs["Secret/pdserve-credentials"]["stringData"]) == set(render.SECRET_FILES)
    assert objs["Service/pdserve-coordinator"]["spec"]["ports"][0]["port"] == values["coordinator"]["port"]


def test_a_manifest_with_a_wrong_field_fails_validation():
    render = render_module()
    docs = render.render(render.load_values())
    docs[0]["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(docs[:1])


def test_container_images_build_pdserve_on_cuda_and_cpu_bases():
    cuda = (ROOT / "deploy" / "docker" / "Dockerfile.cuda").read_text()
    cpu = (ROOT / "deploy" / "docker" / "Dockerfile.cpu").read_text()
    assert "FROM nvidia/cuda:" in cuda and "FROM python:" in cpu
    for text in (cuda, cpu):
        assert 'ENTRYPOINT ["pdserve"]' in text and "USER 10001" in text
