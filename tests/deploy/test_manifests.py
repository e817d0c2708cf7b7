"""The Kubernetes manifests in deploy/k8s, as an operator applies them.

Every overlay is rendered with ``kubectl kustomize`` (the test fails when kubectl is missing);
every standard object is validated offline against the Kubernetes JSON Schemas
(kubernetes-validate, strict: unknown fields are errors) for the oldest and the newest supported
Kubernetes, and every custom resource against tests/deploy/crds.py. Then what an operator would
notice: pods that are not probed or limited, a program change that does not roll the pods, a
Secret in the repository, an admin route on the internet, an autoscaler watching a consumer group
that does not exist, a migration run with another image.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI

from services.common.config import HttpSettings, KafkaSettings
from services.common.program import load_program
from tests.deploy.crds import CUSTOM_RESOURCES
from tests.deploy.support import (
    K8S,
    PUBLIC_PREFIXES,
    ROOT,
    SERVICES,
    build_apps,
    console_scripts,
    consumer_groups,
    containers,
    labels_match,
    pod_spec,
    prefix_matches,
    quantity,
    route_paths,
    serves,
    unknown_settings,
)

OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
COMPONENTS = sorted(p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml"))


def overlays_with(component: str) -> list[str]:
    """The overlays that switch a component on (each component is enabled by one at least: see
    test_there_are_overlays_and_every_component_is_enabled_by_one)."""
    found = []
    for overlay in OVERLAYS:
        text = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        if component in {Path(c).name for c in text.get("components", [])}:
            found.append(overlay)
    return found


# The oldest Kubernetes the manifests support (deploy/k8s/README.md) and the newest with schemas.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# The pods stop in order: preStop (5 s), then the whole shutdown within KAIKU_SHUTDOWN_SECONDS
# (services/common/serve.py, runtime.py), whose default is read from the settings.
MIN_GRACE_SECONDS = 5 + int(HttpSettings.model_fields["shutdown_seconds"].default)
SECRETS_DOC = K8S / "README.md"


# -- rendering --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kubectl() -> str:
    install = (
        "kubectl 1.27 or later (kustomize v5) is needed to render deploy/k8s: the `kubectl` "
        "package of Kubernetes' or the Google Cloud CLI's apt repository (Debian's "
        "kubernetes-client is too old)"
    )
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(f"kubectl is not installed. {install}")
    result = subprocess.run(
        [path, "version", "--client", "-o", "json"], capture_output=True, text=True, check=False
    )
    try:
        version = json.loads(result.stdout)["clientVersion"]
        minor = int(re.sub(r"\D.*", "", version["minor"]))
    except (ValueError, KeyError) as exc:
        pytest.fail(f"cannot tell the version of {path} ({exc}). {install}")
    if (int(version["major"]), minor) < (1, 27):
        pytest.fail(f"{path} is kubectl {version['gitVersion']}. {install}")
    return path


def render(kubectl: str, directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"`kubectl kustomize {directory}` failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass
class Manifests:
    """One rendered overlay."""

    name: str
    docs: list[dict[str, Any]]
    workdir: Path
    _apps: dict[str, FastAPI] = field(default_factory=dict)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.of(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: no single {kind} {name!r}"
        return found[0]

    def configmap(self, base_name: str) -> dict[str, Any]:
        found = [
            d for d in self.of("ConfigMap") if d["metadata"]["name"].startswith(base_name + "-")
        ]
        assert len(found) == 1, f"{self.name}: no single ConfigMap {base_name}-<hash>"
        return found[0]

    @property
    def settings(self) -> dict[str, str]:
        data: dict[str, str] = self.configmap("kaiku-settings")["data"]
        return data

    @property
    def deployments(self) -> dict[str, dict[str, Any]]:
        return {
            d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in self.of("Deployment")
        }

    @property
    def topic_prefix(self) -> str:
        default = str(KafkaSettings.model_fields["topic_prefix"].default)
        return self.settings.get("KAIKU_TOPIC_PREFIX", default)

    @property
    def partitions(self) -> int:
        default = KafkaSettings.model_fields["partitions"].default
        return int(self.settings.get("KAIKU_KAFKA_PARTITIONS", default))

    def program_file(self) -> Path:
        (name, text), *rest = self.configmap("kaiku-program")["data"].items()
        assert not rest, "the program ConfigMap holds one file"
        path: Path = self.workdir / str(name)
        path.write_text(text, encoding="utf-8")
        return path

    def apps(self) -> dict[str, FastAPI]:
        """The services as this overlay's program and topic prefix build them."""
        if not self._apps:
            self._apps = build_apps(self.topic_prefix, self.program_file(), self.workdir)
        return self._apps

    def env_names(self, container: dict[str, Any]) -> set[str]:
        """Every environment variable a container gets from env and ConfigMaps in envFrom."""
        names = {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                data = self.named("ConfigMap", source["configMapRef"]["name"]).get("data", {})
                names.update(data)
        return names


@pytest.fixture(scope="session")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Manifests]:
    return {
        name: Manifests(
            name, render(kubectl, K8S / "overlays" / name), tmp_path_factory.mktemp(name)
        )
        for name in OVERLAYS
    }


@pytest.fixture(params=OVERLAYS)
def m(request: pytest.FixtureRequest, rendered: dict[str, Manifests]) -> Manifests:
    return rendered[request.param]


def workloads(m: Manifests) -> Iterator[dict[str, Any]]:
    yield from m.of("Deployment")
    yield from m.of("Job")


# -- schemas ----------------------------------------------------------------------------------


def test_there_are_overlays_and_every_component_is_enabled_by_one() -> None:
    assert {"dev", "production"} <= set(OVERLAYS)
    assert set(COMPONENTS) == {"keda", "hpa", "monitoring", "ingress"}
    unused = [c for c in COMPONENTS if not overlays_with(c)]
    assert not unused, f"components no overlay enables (so no test renders): {unused}"
    assert set(overlays_with("keda")).isdisjoint(overlays_with("hpa")), "KEDA and HPA together"
    assert set(overlays_with("keda")) >= {"production"}


def test_every_object_validates_against_its_schema(m: Manifests) -> None:
    kinds = set()
    for doc in m.docs:
        kinds.add(doc["kind"])
        where = f"{m.name}: {doc['kind']}/{doc['metadata']['name']}"
        custom = CUSTOM_RESOURCES.get((doc["apiVersion"], doc["kind"]))
        if custom is not None:
            errors = list(jsonschema.Draft202012Validator(custom).iter_errors(doc))
            assert not errors, f"{where}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
            )
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(map(str, e.path))
                pytest.fail(f"{where} is invalid for Kubernetes {version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{where}: {doc['apiVersion']} {doc['kind']} has no schema")
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Job"} <= kinds


# -- pods -------------------------------------------------------------------------------------


def test_every_container_is_limited_and_runs_unprivileged(m: Manifests) -> None:
    for workload in workloads(m):
        name = f"{m.name}: {workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod_ctx = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, name
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(spec):
            where = f"{name} container {c['name']}"
            ctx = c.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 0)) != 0, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), where
            assert not ctx.get("privileged", False), where
            resources = c.get("resources", {})
            for what in ("cpu", "memory"):
                request = resources.get("requests", {}).get(what)
                limit = resources.get("limits", {}).get(what)
                assert request and limit, f"{where}: no {what} request and limit"
                assert quantity(request) <= quantity(limit), f"{where}: {what} request > limit"
            # A read-only root filesystem, and a writable /tmp of the pod's own.
            tmp = [v for v in c.get("volumeMounts", []) if v["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{where}: /tmp is not an emptyDir"


def test_every_service_is_probed_and_stops_gracefully(m: Manifests) -> None:
    assert set(m.deployments) == set(SERVICES)
    port = int(m.settings["KAIKU_PORT"])
    assert m.settings["KAIKU_HOST"] == "0.0.0.0"
    for component, deployment in m.deployments.items():
        where = f"{m.name}: Deployment/{deployment['metadata']['name']}"
        spec = pod_spec(deployment)
        assert spec["terminationGracePeriodSeconds"] >= MIN_GRACE_SECONDS, where
        (container,) = spec["containers"]
        assert container["command"] == ["python", "-m", f"services.{component}"], where
        ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        assert port in ports.values(), f"{where}: KAIKU_PORT {port} is not a container port"
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container.get(probe, {}).get("httpGet")
            assert get, f"{where}: no HTTP {probe}"
            assert get["path"] == path, f"{where}: {probe} is not {path}"
            assert ports.get(get["port"], get["port"]) == port, f"{where}: {probe} port"
        startup = container.get("startupProbe", {}).get("httpGet", {})
        assert startup.get("path") == "/healthz", f"{where}: no startupProbe on /healthz"
        # The probed routes exist in the service as built.
        for path in ("/healthz", "/readyz", "/metrics"):
            assert serves(m.apps()[component], path), f"{component} does not serve {path}"


def test_services_and_disruption_budgets_cover_each_deployment(m: Manifests) -> None:
    for component, deployment in m.deployments.items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        (container,) = pod_spec(deployment)["containers"]
        port_names = {p.get("name") for p in container["ports"]}
        services = [s for s in m.of("Service") if labels_match(s["spec"]["selector"], pod_labels)]
        assert len(services) == 1, f"{m.name}: {component} is not behind exactly one Service"
        for p in services[0]["spec"]["ports"]:
            assert p["targetPort"] in port_names, f"{m.name}: {component} targetPort"
        budgets = [
            b
            for b in m.of("PodDisruptionBudget")
            if labels_match(b["spec"]["selector"]["matchLabels"], pod_labels)
        ]
        assert len(budgets) == 1, f"{m.name}: {component} has no PodDisruptionBudget"
        # maxUnavailable never blocks a drain, whatever the replica count.
        assert budgets[0]["spec"].get("maxUnavailable", 0) >= 1, f"{m.name}: {component} PDB"
        for other, d in m.deployments.items():
            if other != component:
                assert not labels_match(
                    services[0]["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]
                ), f"{m.name}: the {component} Service also selects {other}"


# -- configuration ----------------------------------------------------------------------------


def test_configmaps_carry_a_content_hash_and_every_reference_resolves(m: Manifests) -> None:
    names = {c["metadata"]["name"] for c in m.of("ConfigMap")}
    assert len(names) == 2, names
    for base in ("kaiku-program", "kaiku-settings"):
        cm = m.configmap(base)
        assert len(cm["metadata"]["name"]) == len(base) + 11, f"{base} has no hash suffix"
    for workload in workloads(m):
        spec = pod_spec(workload)
        refs = [v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v]
        for c in containers(spec):
            refs += [s["configMapRef"]["name"] for s in c.get("envFrom", []) if "configMapRef" in s]
            refs += [
                e["valueFrom"]["configMapKeyRef"]["name"]
                for e in c.get("env", [])
                if "configMapKeyRef" in e.get("valueFrom", {})
            ]
        assert refs and set(refs) <= names, f"{workload['metadata']['name']}: {set(refs) - names}"


def test_the_program_is_mounted_where_kaiku_program_points_and_is_valid(m: Manifests) -> None:
    program = m.configmap("kaiku-program")
    (file_name,) = program["data"]
    load_program(m.program_file())  # raises ProgramError with every error and its line
    expected = Path(m.settings["KAIKU_PROGRAM"])
    for workload in workloads(m):
        spec = pod_spec(workload)
        volumes = {
            v["name"]
            for v in spec["volumes"]
            if v.get("configMap", {}).get("name") == program["metadata"]["name"]
        }
        for c in spec["containers"]:
            mounts = [v for v in c["volumeMounts"] if v["name"] in volumes]
            assert any(Path(v["mountPath"]) / file_name == expected for v in mounts), (
                f"{m.name}: {workload['metadata']['name']} does not mount the program at {expected}"
            )


def test_every_setting_is_a_real_kaiku_setting(m: Manifests) -> None:
    # Alert webhooks read their signing secret from the variable the program names.
    program = load_program(m.program_file())
    alert_envs = {w.secret_env for w in program.alerts.webhooks if getattr(w, "secret_env", None)}
    names = set(m.settings)
    for workload in workloads(m):
        for c in containers(pod_spec(workload)):
            names |= {e["name"] for e in c.get("env", [])}
    assert not unknown_settings(names, alert_envs), "not kaiku settings"
    # The migration Job migrates the schemas: the replicas only check theirs (they never race).
    assert m.settings["KAIKU_DATABASE_MIGRATE"] == "check"


def test_a_program_change_rolls_every_pod(kubectl: str, tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    for overlay in OVERLAYS:
        before = Manifests(overlay, render(kubectl, tree / "overlays" / overlay), tmp_path)
        own = tree / "overlays" / overlay / "program.yaml"
        program = own if own.exists() else tree / "base" / "program.yaml"
        program.write_text(program.read_text() + "\n# changed\n")
        after = Manifests(overlay, render(kubectl, tree / "overlays" / overlay), tmp_path)
        old = before.configmap("kaiku-program")["metadata"]["name"]
        new = after.configmap("kaiku-program")["metadata"]["name"]
        assert old != new, f"{overlay}: the program ConfigMap's name does not follow its content"
        for workload in workloads(after):
            volumes = [
                v["configMap"]["name"] for v in pod_spec(workload)["volumes"] if "configMap" in v
            ]
            assert new in volumes, (
                f"{overlay}: {workload['metadata']['name']} keeps the old program"
            )


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_is_rendered_and_every_referenced_secret_is_documented(m: Manifests) -> None:
    assert not m.of("Secret"), f"{m.name} renders a Secret: secrets never live in the repository"
    documented = SECRETS_DOC.read_text(encoding="utf-8")
    referenced: dict[str, bool] = {}  # name -> required
    for workload in workloads(m):
        spec = pod_spec(workload)
        for v in spec.get("volumes", []):
            if "secret" in v:
                referenced[v["secret"]["secretName"]] = not v["secret"].get("optional", False)
        for c in containers(spec):
            for s in c.get("envFrom", []):
                if "secretRef" in s:
                    referenced[s["secretRef"]["name"]] = not s["secretRef"].get("optional", False)
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced[ref["name"]] = not ref.get("optional", False)
    for auth in m.of("TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            referenced[ref["name"]] = True
    for ingress in m.of("Ingress"):
        for tls in ingress["spec"].get("tls", []):
            referenced[tls["secretName"]] = True
    assert referenced.get("kaiku-common")
    for name in referenced:
        assert f"`{name}`" in documented, f"the Secret {name} is not described in {SECRETS_DOC}"


# -- the migration Job ------------------------------------------------------------------------


def test_the_migration_job_runs_kaiku_migrate_with_the_services_image(m: Manifests) -> None:
    (job,) = m.of("Job")
    spec = pod_spec(job)
    (container,) = spec["containers"]
    images = {c["image"] for d in m.of("Deployment") for c in containers(pod_spec(d))}
    assert images == {container["image"]}, f"{m.name}: the Job's image differs: {images}"
    assert "/" in container["image"] and (":" in container["image"] or "@" in container["image"])
    assert container["command"][:2] == ["kaiku", "migrate"]
    assert console_scripts().get("kaiku") == "services.cli:main"
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    assert job["spec"].get("backoffLimit") is not None
    # The same settings and secrets as the services.
    service_sources = {
        (k, s[k]["name"])
        for d in m.of("Deployment")
        for c in pod_spec(d)["containers"]
        for s in c.get("envFrom", [])
        for k in s
        if not s[k].get("optional", False)
    }
    job_sources = {(k, s[k]["name"]) for s in container.get("envFrom", []) for k in s}
    assert service_sources <= job_sources


# -- autoscaling ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", overlays_with("keda"))
def test_keda_scales_each_deployment_on_the_consumer_groups_it_really_runs(
    overlay: str, rendered: dict[str, Manifests]
) -> None:
    m = rendered[overlay]
    scaled = m.of("ScaledObject")
    assert scaled
    auths = {a["metadata"]["name"] for a in m.of("TriggerAuthentication")}
    by_target = {}
    for so in scaled:
        ref = so["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment"
        deployment = m.named("Deployment", ref["name"])
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        by_target[component] = so
        assert "replicas" not in deployment["spec"], f"{ref['name']}: KEDA owns the replicas"
        assert so["spec"]["maxReplicaCount"] <= m.partitions, "more consumers than partitions"
        (container,) = pod_spec(deployment)["containers"]
        env = m.env_names(container)
        kafka = [t for t in so["spec"]["triggers"] if t["type"] == "kafka"]
        seen = set()
        for t in kafka:
            meta = t["metadata"]
            from_env = meta.get("bootstrapServersFromEnv")
            assert meta.get("bootstrapServers") or from_env in env, (
                f"{ref['name']}: the bootstrap servers come from {from_env}, which the pod lacks"
            )
            assert meta.get("offsetResetPolicy") == "earliest"  # as the consumers start
            assert int(meta["lagThreshold"]) > 0
            assert t["authenticationRef"]["name"] in auths
            seen.add((meta["consumerGroup"], meta["topic"]))
        real = consumer_groups(m.apps()[component])
        assert seen == real, (
            f"{m.name}: the ScaledObject of {component} watches {sorted(seen)}, "
            f"the service consumes {sorted(real)}"
        )
    assert set(by_target) == set(SERVICES), "every consuming Deployment is scaled by KEDA"


def test_hpa_scales_existing_deployments_and_never_beside_keda(m: Manifests) -> None:
    hpas = m.of("HorizontalPodAutoscaler")
    keda_targets = {so["spec"]["scaleTargetRef"]["name"] for so in m.of("ScaledObject")}
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        deployment = m.named(ref["kind"], ref["name"])
        assert "replicas" not in deployment["spec"], f"{ref['name']}: the HPA owns the replicas"
        assert ref["name"] not in keda_targets, f"{ref['name']} is scaled by KEDA and an HPA"
        assert hpa["spec"]["maxReplicas"] <= m.partitions, "more consumers than partitions"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        metrics = hpa["spec"]["metrics"]
        assert any(x["type"] == "Resource" and x["resource"]["name"] == "cpu" for x in metrics)
    if not hpas and not keda_targets:
        for d in m.of("Deployment"):
            assert d["spec"].get("replicas", 1) >= 2, "a fixed replica count needs two for the PDB"


# -- monitoring and ingress -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", overlays_with("monitoring"))
def test_service_monitor_scrapes_metrics_of_every_service(
    overlay: str, rendered: dict[str, Manifests]
) -> None:
    m = rendered[overlay]
    (monitor,) = m.of("ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in m.of("Service") if labels_match(selector, s["metadata"]["labels"])]
    assert len(selected) == len(SERVICES)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for service in selected:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", overlays_with("ingress"))
def test_ingress_exposes_exactly_the_public_routes(
    overlay: str, rendered: dict[str, Manifests]
) -> None:
    m = rendered[overlay]
    (ingress,) = m.of("Ingress")
    (rule,) = ingress["spec"]["rules"]
    routes: dict[str, str] = {}  # ingress path -> service component
    for p in rule["http"]["paths"]:
        assert p["pathType"] == "Prefix"
        service = m.named("Service", p["backend"]["service"]["name"])
        routes[p["path"]] = service["spec"]["selector"]["app.kubernetes.io/component"]
    assert {p.rstrip("/") for p in routes} == set(PUBLIC_PREFIXES)

    apps = m.apps()
    for component, app in apps.items():
        for path in route_paths(app):
            exposed = [ip for ip in routes if prefix_matches(ip, path)]
            public = any(prefix_matches(p, path) for p in PUBLIC_PREFIXES)
            assert bool(exposed) == public, f"{component} {path}: exposed={exposed}"
            for ip in exposed:
                assert routes[ip] == component, (
                    f"{path} goes to {routes[ip]}, {component} serves it"
                )
    for ip, component in routes.items():
        assert any(prefix_matches(ip, p) for p in route_paths(apps[component])), (
            f"{ip} goes to {component}, which serves nothing there"
        )

    # Links in emails, vendors' webhooks and providers' callbacks use the ingress host.
    host = rule["host"]
    public_url = urlsplit(m.settings["KAIKU_PUBLIC_URL"])
    assert public_url.hostname == host, f"KAIKU_PUBLIC_URL is not on the ingress host {host}"
    assert public_url.scheme == "https"
    assert any(host in t.get("hosts", []) for t in ingress["spec"].get("tls", [])), "no TLS"
    for name in ("KAIKU_TRIGGER_WEBHOOK_PUBLIC_URL", "KAIKU_PROVIDER_CALLBACK_URL"):
        if name in m.settings:
            assert urlsplit(m.settings[name]).hostname == host, name


def test_the_documented_fields_exist() -> None:
    """deploy/k8s/README.md names every file an operator edits; they must exist."""
    text = SECRETS_DOC.read_text(encoding="utf-8")
    for relative in (
        "overlays/production/kustomization.yaml",
        "overlays/production/settings.env",
        "overlays/production/program.yaml",
        "base/settings.env",
    ):
        assert relative in text, relative
        assert (K8S / relative).exists(), relative
    assert (ROOT / "deploy" / "local" / "program.yaml").exists()
