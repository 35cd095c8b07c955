"""deploy/kubernetes: every overlay rendered (kustomize, as `kubectl kustomize` does), every object validated against
the Kubernetes schemas (kubernetes-validate, strict), and the rules that keep the services right in a cluster.

No cluster runs here; what the tests check is what the manifests say: the drain fits in the grace period, the probes
ask grpc.health.v1 on the gRPC ports, JobService's generator target is the headless Service, the NetworkPolicies let
only JobService reach the generators and only the generators reach the internet's HTTPS, and so on.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.processes import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").exists())
SCHEMA_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are for (native gRPC probes: 1.27+)
Object = dict[str, Any]


@cache
def render(overlay: str, components: tuple[str, ...] = ()) -> list[Object]:
    """An overlay as `kubectl kustomize` renders it; with components, through a temporary overlay over it."""
    if components:
        # kustomize refuses absolute paths to other kustomizations: the temporary one sits beside the overlays.
        scratch = KUBERNETES / f".test-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        try:
            (scratch / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "kustomize.config.k8s.io/v1beta1",
                        "kind": "Kustomization",
                        "resources": [f"../overlays/{overlay}"],
                        "components": [f"../components/{c}" for c in components],
                    }
                )
            )
            return kustomize(scratch)
        finally:
            shutil.rmtree(scratch)
    return kustomize(KUBERNETES / "overlays" / overlay)


def kustomize(folder: Path) -> list[Object]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/kubernetes")
        pytest.skip("kubectl not installed: deploy/kubernetes is rendered and checked in CI")
    out = subprocess.run(
        [kubectl, "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def of_kind(objects: list[Object], kind: str) -> dict[str, Object]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: Object) -> Object:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env(deployment: Object) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_overlays_exist() -> None:
    assert OVERLAYS == ["production", "staging"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(overlay)
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "Namespace",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
        ]
    )
    for version in (SCHEMA_VERSION, kubernetes_validate.latest_version()):
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError with the path


def test_the_validator_rejects_what_a_cluster_would() -> None:
    deployment = of_kind(render("production"), "Deployment")["imagegen-generator"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "ninety"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, SCHEMA_VERSION, strict=True)
    unknown = yaml.safe_load(yaml.safe_dump(deployment))
    unknown["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50052}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, SCHEMA_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_gets_longer_than_its_drain_before_it_is_killed(overlay: str) -> None:
    deployments = of_kind(render(overlay), "Deployment")
    for name, grace_setting in (
        ("imagegen-generator", "GEN_SHUTDOWN_GRACE_SECONDS"),
        ("imagegen-job", "JOB_SHUTDOWN_GRACE_SECONDS"),
    ):
        spec = deployments[name]["spec"]["template"]["spec"]
        drain = float(env(deployments[name])[grace_setting])
        pre_stop = container(deployments[name])["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        # SIGTERM comes after preStop, and the drain must end before the kubelet's SIGKILL.
        assert spec["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 10, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_grpc_health_on_the_grpc_ports(overlay: str) -> None:
    deployments = of_kind(render(overlay), "Deployment")
    for name, port_setting in (("imagegen-generator", "GEN_PORT"), ("imagegen-job", "JOB_PORT")):
        c = container(deployments[name])
        port = int(env(deployments[name])[port_setting])
        assert {"name": "grpc", "containerPort": port} in c["ports"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, f"{name} {probe}"
        # Liveness gives up far later than readiness: a draining or database-less pod leaves the endpoints,
        # it is not restarted for it.
        live, ready = c["livenessProbe"], c["readinessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > 3 * ready["periodSeconds"] * ready["failureThreshold"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_generator_target_is_the_headless_service_of_every_generator_pod(overlay: str) -> None:
    objects = render(overlay)
    namespace = next(o for o in objects if o["kind"] == "Namespace")["metadata"]["name"]
    job = of_kind(objects, "Deployment")["imagegen-job"]
    job_env = env(job)
    # $(POD_NAMESPACE) is expanded by the kubelet from the pod's own namespace (declared before its use).
    names = [e["name"] for e in container(job)["env"]]
    assert names.index("POD_NAMESPACE") < names.index("JOB_GENERATOR_TARGET")
    assert job_env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    match = re.fullmatch(
        r"dns:///([a-z0-9-]+)\.\$\(POD_NAMESPACE\)\.svc\.cluster\.local:(\d+)", job_env["JOB_GENERATOR_TARGET"]
    )
    assert match, job_env["JOB_GENERATOR_TARGET"]
    service = of_kind(objects, "Service")[match.group(1)]
    assert service["metadata"]["namespace"] == namespace
    # Headless: DNS answers with every ready pod's address, so round_robin reaches each one.
    assert service["spec"]["clusterIP"] == "None"
    generator = of_kind(objects, "Deployment")["imagegen-generator"]
    assert labels_match(service["spec"]["selector"], generator["spec"]["template"]["metadata"]["labels"])
    assert not labels_match(service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    port = next(p for p in service["spec"]["ports"] if p["port"] == int(match.group(2)))
    assert port["targetPort"] == "grpc" and int(env(generator)["GEN_PORT"]) == port["port"]
    assert (
        job_env["JOB_GENERATOR_TOKEN"]["secretKeyRef"]["key"] == env(generator)["GEN_AUTH_TOKEN"]["secretKeyRef"]["key"]
    )
    # Streams are placed anew within seconds, so a generator pod that starts gets its share soon.
    assert float(job_env["JOB_GENERATOR_STREAM_MAX_AGE_SECONDS"]) <= 15


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(overlay: str) -> None:
    objects = render(overlay)
    assert not of_kind(objects, "Secret"), "Secrets are created outside the manifests (docs/deploy.md)"
    secret_like = re.compile(r"SECRET|TOKEN|KEY|PASSWORD|DATABASE_URL")
    for o in [*of_kind(objects, "Deployment").values(), *of_kind(objects, "Job").values()]:
        for c in o["spec"]["template"]["spec"]["containers"]:
            for e in c["env"]:
                if secret_like.search(e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{o['metadata']['name']}: {e['name']} inlined"
    for config in of_kind(objects, "ConfigMap").values():
        assert not [k for k in config["data"] if secret_like.search(k)], config["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_read_only_without_capabilities_within_limits(overlay: str) -> None:
    objects = render(overlay)
    workloads = [*of_kind(objects, "Deployment").values(), *of_kind(objects, "Job").values()]
    assert len(workloads) == 3
    for o in workloads:
        pod = o["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
            assert c["resources"]["limits"]["memory"]
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_disruption_and_migration_objects(overlay: str) -> None:
    objects = render(overlay)
    deployments = of_kind(objects, "Deployment")
    autoscalers = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objects, "HorizontalPodAutoscaler").values()}
    budgets = of_kind(objects, "PodDisruptionBudget").values()
    for name, deployment in deployments.items():
        assert "replicas" not in deployment["spec"], f"{name}: the autoscaler owns replicas"
        assert autoscalers[name]["spec"]["minReplicas"] >= 1
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if labels_match(b["spec"]["selector"]["matchLabels"], pod_labels)]
        assert len(covering) == 1 and covering[0]["spec"]["maxUnavailable"] == 1, name
    assert autoscalers["imagegen-generator"]["spec"]["minReplicas"] >= 2  # round robin needs someone to rotate to
    migrate = of_kind(objects, "Job")["imagegen-migrate"]
    assert container(migrate)["command"] == ["python", "-m", "job_service", "migrate"]
    assert float(env(migrate)["JOB_MIGRATE_WAIT_SECONDS"]) > 0
    assert env(deployments["imagegen-job"])["JOB_MIGRATE_ON_START"] == "false"


# -- NetworkPolicies, evaluated: a connection is allowed when an egress rule of the source and an ingress rule of
# the destination both allow it (in-namespace pods), or the source's egress allows the external address.

Peer = dict[str, Any]


def selected(policy: Object, labels: dict[str, str]) -> bool:
    return labels_match(policy["spec"]["podSelector"].get("matchLabels", {}), labels)


def port_allowed(rule: Object, port: int) -> bool:
    return "ports" not in rule or any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in rule["ports"])


def peer_allows(peer: Peer, labels: dict[str, str] | None, address: str | None) -> bool:
    if "ipBlock" in peer:
        if address is None:
            return False
        ip = ipaddress.ip_address(address)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if "namespaceSelector" in peer:
        return False  # other namespaces: not the pods of ours asked about here
    return labels is not None and labels_match(peer["podSelector"].get("matchLabels", {}), labels)


def allowed(
    policies: list[Object],
    source: dict[str, str],
    port: int,
    *,
    to: dict[str, str] | None = None,
    address: str | None = None,
) -> bool:
    def direction_allows(
        direction: str, pod: dict[str, str], other: dict[str, str] | None, other_address: str | None
    ) -> bool:
        relevant = [p for p in policies if selected(p, pod) and direction.capitalize() in p["spec"]["policyTypes"]]
        assert relevant, "the default-deny policy selects every pod"
        key = "to" if direction == "egress" else "from"
        return any(
            port_allowed(rule, port)
            and (key not in rule or any(peer_allows(peer, other, other_address) for peer in rule[key]))
            for p in relevant
            for rule in p["spec"].get(direction, [])
        )

    if not direction_allows("egress", source, to, address):
        return False
    return to is None or direction_allows("ingress", to, source, None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_only_job_service_reaches_the_generators_only_generators_reach_out(overlay: str) -> None:
    objects = render(overlay)
    policies = list(of_kind(objects, "NetworkPolicy").values())
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    pods = {
        name: o["spec"]["template"]["metadata"]["labels"]
        for name, o in [*of_kind(objects, "Deployment").items(), *of_kind(objects, "Job").items()]
    }
    job, generator, migrate = pods["imagegen-job"], pods["imagegen-generator"], pods["imagegen-migrate"]
    provider = "142.250.74.10"  # a public address: Google's APIs, Supabase Storage

    assert allowed(policies, job, 50052, to=generator)
    assert not allowed(policies, migrate, 50052, to=generator)
    assert not allowed(policies, generator, 50052, to=generator)
    assert not allowed(policies, generator, 50051, to=job)  # the generators call nobody of ours

    assert allowed(policies, generator, 443, address=provider)
    for name, pod in (("job", job), ("migrate", migrate)):
        assert not allowed(policies, pod, 443, address=provider), f"{name} must not reach storage or the providers"
    assert not allowed(policies, generator, 443, address="10.0.0.12"), "generators: the internet, not the cluster"
    assert not allowed(policies, generator, 5432, address=provider), "generators never talk to PostgreSQL"

    for pod in (job, migrate):
        assert allowed(policies, pod, 5432, address=provider)


def test_the_jwks_component_lets_job_service_fetch_keys_over_https_and_validates() -> None:
    objects = render("production", ("jwks-egress",))
    for obj in objects:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
    policies = list(of_kind(objects, "NetworkPolicy").values())
    job = of_kind(objects, "Deployment")["imagegen-job"]["spec"]["template"]["metadata"]["labels"]
    generator = of_kind(objects, "Deployment")["imagegen-generator"]["spec"]["template"]["metadata"]["labels"]
    migrate = of_kind(objects, "Job")["imagegen-migrate"]["spec"]["template"]["metadata"]["labels"]
    assert allowed(policies, job, 443, address="142.250.74.10")
    assert not allowed(policies, job, 443, address="10.0.0.12")
    assert not allowed(policies, migrate, 443, address="142.250.74.10")
    assert allowed(policies, job, 50052, to=generator) and not allowed(policies, migrate, 50052, to=generator)
