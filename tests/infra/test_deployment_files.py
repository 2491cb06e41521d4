"""The deployment files agree with infra/cluster.env and pyproject.toml: Dockerfile, infra/compose.yaml,
infra/helm/values.yaml and infra/helm/mlflow.yaml.

Nothing here needs Docker or Kubernetes: the files are parsed, and each Airflow and MLflow container's
environment is compared with cluster.env rendered for that deployment's addresses. The cluster.env parser
is this test's own, not tasks.cluster's, so a bug there cannot hide drift here.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_ENV = REPO / "infra" / "cluster.env"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "infra" / "compose.yaml"
INITDB = REPO / "infra" / "compose" / "initdb.sql"
HELM_VALUES = REPO / "infra" / "helm" / "values.yaml"
HELM_MLFLOW = REPO / "infra" / "helm" / "mlflow.yaml"

# Each deployment's addresses for cluster.env's {placeholders}; each file's header comment lists the same.
COMPOSE_ADDRESSES = {
    "pg": "postgres:5432",
    "redis": "redis:6379",
    "s3": "http://minio:9000",
    "mlflow": "http://mlflow:5000",
    "api": "http://airflow-apiserver:8080",
}
HELM_ADDRESSES = {
    "pg": "postgresql.shrinkflow.svc:5432",
    "redis": "redis.shrinkflow.svc:6379",
    "s3": "http://minio.shrinkflow.svc:9000",
    "mlflow": "http://mlflow.shrinkflow.svc:5000",
    "api": "http://airflow-api-server:8080",
}

# What a container may set beyond cluster.env: the secrets (never in cluster.env), and per-deployment tuning.
SECRETS = {
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__CORE__FERNET_KEY",
    "PGPASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
WORKER_THREADS = {"OMP_NUM_THREADS", "TVM_NUM_THREADS"}
MLFLOW_SERVER_ONLY = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION"}
SECRET_NAME = "shrinkflow-secrets"  # the Kubernetes Secret

COMPOSE_AIRFLOW = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
COMPOSE_SERVICES = {"postgres", "redis", "minio", "minio-init", "mlflow", *COMPOSE_AIRFLOW}
COMPOSE_EXTRAS = {"airflow-worker": SECRETS | WORKER_THREADS, "mlflow": SECRETS | MLFLOW_SERVER_ONLY}
# Set by the chart from its secrets unless switched off; `env` sets them from cluster.env instead.
CHART_BUILT_IN = (
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CELERY__BROKER_URL",
)

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def read_cluster_env(path: Path = CLUSTER_ENV) -> dict[str, str]:
    """KEY=value lines (comments and blank lines skipped), placeholders kept."""
    env: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key.strip().isidentifier(), f"{rel(path)}:{n}: expected KEY=value, got {line!r}"
        assert key.strip() not in env, f"{rel(path)}:{n}: {key.strip()} is set twice"
        env[key.strip()] = value.strip()
    return env


def render(env: dict[str, str], addresses: dict[str, str], deployment: str) -> dict[str, str]:
    """cluster.env with one deployment's addresses in place of its placeholders."""
    unknown = sorted({name for v in env.values() for name in _PLACEHOLDER.findall(v)} - addresses.keys())
    assert not unknown, (
        f"{rel(CLUSTER_ENV)} uses {', '.join('{' + u + '}' for u in unknown)}, for which "
        f"{deployment} has no address: add it to that file and to this test's map"
    )
    return {k: _PLACEHOLDER.sub(lambda m: addresses[m.group(1)], v) for k, v in env.items()}


def env_problems(where: str, env: dict[str, Any], expected: dict[str, str], extras: set[str]) -> list[str]:
    """Each difference of `env` from `expected` (keys in `extras` may be added), naming `where` and the key."""
    problems = []
    for key, value in expected.items():
        if key not in env:
            problems.append(f"{where}: {key} is missing (infra/cluster.env gives {value!r})")
        elif not isinstance(env[key], str):
            problems.append(f"{where}: {key} is {env[key]!r}, a YAML {type(env[key]).__name__}: quote it")
        elif env[key] != value:
            problems.append(f"{where}: {key}={env[key]!r}, but infra/cluster.env gives {value!r}")
    for key in sorted(env.keys() - expected.keys() - extras):
        problems.append(
            f"{where}: {key} is set, but it is not in infra/cluster.env nor an allowed extra "
            f"(a secret or per-deployment setting listed in {rel(Path(__file__))})"
        )
    return problems


def image_is_pinned(image: str) -> bool:
    """A tag other than latest, or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and bool(tag) and "/" not in tag and tag != "latest"


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, str]:
    env = read_cluster_env()
    assert env, f"{rel(CLUSTER_ENV)} has no KEY=value line"
    return env


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def shrinkflow_image(pyproject) -> str:
    return f"shrinkflow:{pyproject['version']}"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(HELM_VALUES.read_text())


@pytest.fixture(scope="module")
def mlflow_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(HELM_MLFLOW.read_text()) if d]


# --- Dockerfile -------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    word: str
    args: str
    heredoc: str = ""


def dockerfile_instructions(text: str) -> list[Instruction]:
    """The instructions, with continuation lines joined and heredoc bodies attached."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i].strip()
            i += 1
            if not nxt.startswith("#"):
                line = line[:-1].rstrip() + " " + nxt
        word, _, args = line.partition(" ")
        body: list[str] = []
        if m := re.search(r"<<-?['\"]?(\w+)['\"]?", args):
            while i < len(lines) and lines[i].strip() != m.group(1):
                body.append(lines[i])
                i += 1
            i += 1
        out.append(Instruction(word.upper(), args.strip(), "\n".join(body)))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.word == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(ins.args)))
    return env


def test_dockerfile_is_python_311_and_pins_cpu_torch_before_the_project(dockerfile, pyproject):
    base = next(ins.args for ins in dockerfile if ins.word == "FROM").split()[-1]
    assert base.startswith("python:3.11-"), f"Dockerfile: FROM {base}, but pyproject wants Python 3.11"
    pin = next(d.replace(" ", "") for d in pyproject["dependencies"] if re.match(r"torch\s*==", d))
    runs = [ins.args for ins in dockerfile if ins.word == "RUN"]
    torch_at = next((n for n, r in enumerate(runs) if pin in r), None)
    assert torch_at is not None, f"Dockerfile: no RUN installs {pin} (pyproject's torch pin)"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_at], (
        f"Dockerfile: {pin} must come from --index-url https://download.pytorch.org/whl/cpu "
        f"(else pip takes the CUDA build from PyPI): {runs[torch_at]!r}"
    )
    project_at = next(
        (n for n, r in enumerate(runs) if re.search(r"pip install .*['\"]\.\[cluster\]['\"]", r)), None
    )
    assert project_at is not None, (
        'Dockerfile: no RUN pip install ".[cluster]" (the project with its cluster extra)'
    )
    assert torch_at < project_at, "Dockerfile: the CPU torch must be installed before the project"
    assert "download.pytorch.org" not in runs[project_at], "Dockerfile: the project install must use PyPI"


def test_dockerfile_copies_the_project_and_sets_its_paths(dockerfile, shrinkflow_image):
    copied = " ".join(ins.args for ins in dockerfile if ins.word == "COPY")
    for item in (
        "dags/",
        "tasks/",
        "compression_ops/",
        "infra/",
        "pipelines.yaml",
        "pyproject.toml",
        "README.md",
    ):
        assert re.search(rf"(^|\s){re.escape(item)}(\s|$)", copied), f"Dockerfile: {item} is not copied"
    workdir = next(ins.args for ins in dockerfile if ins.word == "WORKDIR")
    assert workdir == "/opt/shrinkflow", f"Dockerfile: WORKDIR {workdir}"
    env = dockerfile_env(dockerfile)
    for key, value in {
        "AIRFLOW__CORE__DAGS_FOLDER": f"{workdir}/dags",
        "SHRINKFLOW_PIPELINES": f"{workdir}/pipelines.yaml",
        "SHRINKFLOW_HOME": f"{workdir}/cache",
    }.items():
        assert env.get(key) == value, f"Dockerfile: ENV {key}={env.get(key)!r}, expected {value!r}"
    users = [ins.args for ins in dockerfile if ins.word == "USER"]
    assert users and users[-1] == "shrinkflow", (
        f"Dockerfile: the image must end as USER shrinkflow, not {users}"
    )
    assert re.search(
        r"useradd .*--uid 50000 .*shrinkflow", " ".join(i.args for i in dockerfile if i.word == "RUN")
    ), "Dockerfile: user shrinkflow must have uid 50000 (the uid Airflow's Helm chart runs pods as)"
    assert f"docker build -t {shrinkflow_image} ." in DOCKERFILE.read_text(), (
        f"Dockerfile: its header must say `docker build -t {shrinkflow_image} .` (pyproject's version)"
    )


def test_dockerfile_entrypoint_runs_airflow_unless_given_a_program(dockerfile, tmp_path):
    script = next(
        (ins.heredoc for ins in dockerfile if ins.word == "COPY" and ins.args.endswith(" /entrypoint")), None
    )
    assert script, "Dockerfile: no COPY <<EOF ... /entrypoint heredoc"
    entrypoint = next(ins.args for ins in dockerfile if ins.word == "ENTRYPOINT")
    assert "/entrypoint" in entrypoint, f"Dockerfile: ENTRYPOINT {entrypoint} does not run /entrypoint"
    (tmp_path / "entrypoint").write_text(script + "\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for prog in ("airflow", "mlflow", "bash", "python"):
        (fake_bin / prog).write_text(f'#!/bin/sh\necho {prog} "$@"\n')
        (fake_bin / prog).chmod(0o755)
    cases = {
        ("scheduler",): "airflow scheduler",
        ("celery", "worker"): "airflow celery worker",  # compose's worker; `celery` alone is Celery's own CLI
        ("db", "migrate"): "airflow db migrate",
        ("airflow", "db", "check-migrations"): "airflow db check-migrations",  # the chart's init containers
        ("bash", "-c", "exec airflow scheduler"): "bash -c exec airflow scheduler",  # the chart's args
        ("python", "-m", "celery"): "python -m celery",  # the chart's worker probe
        ("mlflow", "server"): "mlflow server",
    }
    for argv, expected in cases.items():
        out = subprocess.run(
            ["/bin/sh", str(tmp_path / "entrypoint"), *argv],
            capture_output=True,
            text=True,
            env={"PATH": str(fake_bin)},
            timeout=10,
        )
        assert out.stdout.strip() == expected, (
            f"Dockerfile /entrypoint {' '.join(argv)!r} ran {out.stdout.strip()!r} ({out.stderr.strip()}), "
            f"expected {expected!r}"
        )


# --- images -----------------------------------------------------------------------------------------------


def test_every_image_is_pinned_and_shrinkflow_is_pyprojects_version(
    compose, values, mlflow_docs, shrinkflow_image
):
    images = {
        f"{rel(COMPOSE)} services.{name}.image": svc.get("image") for name, svc in compose["services"].items()
    }
    airflow = values["images"]["airflow"]
    images[f"{rel(HELM_VALUES)} images.airflow"] = f"{airflow['repository']}:{airflow['tag']}"
    images[f"{rel(HELM_VALUES)} defaultAirflowRepository:defaultAirflowTag"] = (
        f"{values['defaultAirflowRepository']}:{values['defaultAirflowTag']}"
    )
    for doc in mlflow_docs:
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            images[f"{rel(HELM_MLFLOW)} {doc['kind']} {doc['metadata']['name']} container {c['name']}"] = c[
                "image"
            ]
    for where, image in images.items():
        assert isinstance(image, str) and image_is_pinned(image), (
            f"{where}: image {image!r} is not pinned to a tag"
        )
        if image.split(":")[0] == "shrinkflow":
            assert image == shrinkflow_image, (
                f"{where}: {image}, but pyproject's version makes it {shrinkflow_image}"
            )
    for name in (*COMPOSE_AIRFLOW, "mlflow"):
        where = f"{rel(COMPOSE)} services.{name}.image"
        assert images[where] == shrinkflow_image, f"{where}: {images[where]!r}, expected {shrinkflow_image}"
    assert isinstance(airflow["tag"], str), f"{rel(HELM_VALUES)} images.airflow.tag: quote it"


def test_address_maps_are_recorded_in_the_file_headers():
    for path, addresses in ((COMPOSE, COMPOSE_ADDRESSES), (HELM_VALUES, HELM_ADDRESSES)):
        text = path.read_text()
        for name, address in addresses.items():
            assert f"{name}={address}" in text, (
                f"{rel(path)}: its header comment must record {name}={address}, the address this test renders "
                f"cluster.env's {{{name}}} with"
            )


# --- compose ----------------------------------------------------------------------------------------------


def compose_env(compose: dict[str, Any], service: str) -> dict[str, Any]:
    env = compose["services"][service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def command_text(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else str(value or "")


def test_compose_has_the_services_and_the_worker_runs_celery(compose):
    services = compose["services"]
    missing = COMPOSE_SERVICES - services.keys()
    assert not missing, f"{rel(COMPOSE)}: services {sorted(missing)} are missing"
    worker = services["airflow-worker"]
    assert "celery worker" in command_text(worker.get("command")), (
        f"{rel(COMPOSE)} services.airflow-worker.command: {worker.get('command')!r} does not run `celery worker`"
    )
    replicas = (worker.get("deploy") or {}).get("replicas")
    default = re.fullmatch(r"\$\{\w+:-(\d+)\}", replicas) if isinstance(replicas, str) else None
    count = int(default.group(1)) if default else replicas
    assert isinstance(count, int) and count >= 2, (
        f"{rel(COMPOSE)} services.airflow-worker.deploy.replicas: {replicas!r}, expected 2 or more workers"
    )
    for name in COMPOSE_AIRFLOW:
        deps = services[name].get("depends_on") or {}
        for dep in ("postgres", "redis"):
            assert (deps.get(dep) or {}).get("condition") == "service_healthy", (
                f"{rel(COMPOSE)} services.{name}.depends_on.{dep}: must wait for service_healthy"
            )


@pytest.mark.parametrize("service", [*COMPOSE_AIRFLOW, "mlflow"])
def test_compose_environment_is_cluster_env(compose, cluster_env, service):
    expected = render(cluster_env, COMPOSE_ADDRESSES, rel(COMPOSE))
    where = f"{rel(COMPOSE)} services.{service}.environment"
    problems = env_problems(
        where, compose_env(compose, service), expected, COMPOSE_EXTRAS.get(service, SECRETS)
    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("service", [*COMPOSE_AIRFLOW, "mlflow"])
def test_compose_secrets_come_from_the_environment(compose, service):
    env = compose_env(compose, service)
    for key in sorted(SECRETS):
        value = env.get(key)
        assert isinstance(value, str) and re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), (
            f"{rel(COMPOSE)} services.{service}.environment.{key}: {value!r}; a secret must be "
            "${VAR:?message}, taken from the environment or infra/.env and never written here"
        )


def test_compose_creates_the_databases_and_buckets_of_cluster_env(compose, cluster_env):
    rendered = render(cluster_env, COMPOSE_ADDRESSES, rel(COMPOSE))
    databases = {urlsplit(v).path.lstrip("/") for v in rendered.values() if "postgresql" in v.split("://")[0]}
    sql = INITDB.read_text()
    for db in sorted(databases):
        assert re.search(rf"CREATE DATABASE \"?{db}\"?\s*;", sql), f"{rel(INITDB)}: no CREATE DATABASE {db}"
    mounts = " ".join(compose["services"]["postgres"].get("volumes") or [])
    assert "./compose/initdb.sql:/docker-entrypoint-initdb.d/" in mounts, (
        f"{rel(COMPOSE)} services.postgres.volumes: {rel(INITDB)} is not mounted in docker-entrypoint-initdb.d"
    )
    buckets = {urlsplit(v).netloc for v in rendered.values() if v.startswith("s3://")}
    init = command_text(compose["services"]["minio-init"].get("command"))
    for bucket in sorted(buckets):
        assert f"local/{bucket}" in init, (
            f"{rel(COMPOSE)} services.minio-init.command: bucket {bucket} not created"
        )


def allowed_hosts(command: str) -> list[str]:
    m = re.search(r"--allowed-hosts[ =]\"?([^\"\s]+)", command)
    return m.group(1).split(",") if m else []


def test_compose_mlflow_serves_artifacts_to_the_airflow_containers(compose):
    command = command_text(compose["services"]["mlflow"].get("command"))
    for flag in (
        "--serve-artifacts",
        "--host 0.0.0.0",
        "--port 5000",
        "$$MLFLOW_BACKEND_STORE_URI",
        "$$MLFLOW_ARTIFACTS_DESTINATION",
    ):
        assert flag in command, f"{rel(COMPOSE)} services.mlflow.command: {flag} is missing"
    host = urlsplit(COMPOSE_ADDRESSES["mlflow"]).netloc
    assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed_hosts(command)), (
        f"{rel(COMPOSE)} services.mlflow.command: --allowed-hosts must admit {host} (MLflow answers 403 otherwise)"
    )


# --- helm -------------------------------------------------------------------------------------------------


def test_helm_env_is_cluster_env_and_secrets_come_from_the_secret(values, cluster_env):
    where = f"{rel(HELM_VALUES)} env"
    names = [item["name"] for item in values["env"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"{where}: {dupes} set more than once"
    env = {item["name"]: item.get("value") for item in values["env"]}
    problems = env_problems(where, env, render(cluster_env, HELM_ADDRESSES, rel(HELM_VALUES)), set())
    assert not problems, "\n".join(problems)

    from_secret = {}
    for item in values.get("secret") or []:
        assert item.get("secretName") == SECRET_NAME, (
            f"{rel(HELM_VALUES)} secret.{item.get('envName')}: secretName {item.get('secretName')!r}, "
            f"expected {SECRET_NAME}"
        )
        from_secret[item["envName"]] = item
    from_secret.update(
        {
            "AIRFLOW__CORE__FERNET_KEY": values.get("fernetKeySecretName"),
            "AIRFLOW__API_AUTH__JWT_SECRET": values.get("jwtSecretName"),
        }
    )
    for key in ("fernetKeySecretName", "jwtSecretName"):
        assert values.get(key) == SECRET_NAME, (
            f"{rel(HELM_VALUES)} {key}: {values.get(key)!r}, expected {SECRET_NAME}"
        )
    assert from_secret.keys() == SECRETS, (
        f"{rel(HELM_VALUES)} secret: the secrets are {sorted(SECRETS)}, but it provides {sorted(from_secret)}"
    )
    both = sorted(from_secret.keys() & env.keys())
    assert not both, f"{where}: {both} are secrets, set in env too"

    built_in = values.get("enableBuiltInSecretEnvVars") or {}
    for key in CHART_BUILT_IN:
        if key in cluster_env:
            assert built_in.get(key) is False, (
                f"{rel(HELM_VALUES)} enableBuiltInSecretEnvVars.{key}: must be false, or the chart sets it too, "
                "from its own secret"
            )


def test_helm_settings_the_chart_derives_agree_with_cluster_env(values, cluster_env, dockerfile):
    rendered = render(cluster_env, HELM_ADDRESSES, rel(HELM_VALUES))
    concurrency = values["config"]["celery"]["worker_concurrency"]
    assert str(concurrency) == rendered["AIRFLOW__CELERY__WORKER_CONCURRENCY"], (
        f"{rel(HELM_VALUES)} config.celery.worker_concurrency: {concurrency}, but infra/cluster.env's "
        f"AIRFLOW__CELERY__WORKER_CONCURRENCY is {rendered['AIRFLOW__CELERY__WORKER_CONCURRENCY']} (KEDA divides by it)"
    )
    broker = (values.get("data") or {}).get("brokerUrl")
    if broker is not None:
        assert broker == rendered["AIRFLOW__CELERY__BROKER_URL"], (
            f"{rel(HELM_VALUES)} data.brokerUrl: {broker!r}, but infra/cluster.env gives "
            f"{rendered['AIRFLOW__CELERY__BROKER_URL']!r}"
        )
    dags = dockerfile_env(dockerfile)["AIRFLOW__CORE__DAGS_FOLDER"]
    assert values["config"]["core"]["dags_folder"] == dags, (
        f"{rel(HELM_VALUES)} config.core.dags_folder: {values['config']['core']['dags_folder']!r}, but the image's "
        f"DAGs are in {dags}"
    )
    assert values.get("airflowHome", "/opt/airflow") == dockerfile_env(dockerfile)["AIRFLOW_HOME"], (
        f"{rel(HELM_VALUES)} airflowHome: must be the image's AIRFLOW_HOME (the chart mounts airflow.cfg there)"
    )
    assert not values["dags"]["persistence"]["enabled"] and not values["dags"]["gitSync"]["enabled"], (
        f"{rel(HELM_VALUES)} dags: the DAGs are baked into the image; persistence and gitSync must be off"
    )
    assert values["postgresql"]["enabled"] is False, (
        f"{rel(HELM_VALUES)} postgresql.enabled: the metadata DB is the external {HELM_ADDRESSES['pg']}"
    )
    assert "fab" not in values["config"]["core"]["auth_manager"].lower(), (
        f"{rel(HELM_VALUES)} config.core.auth_manager: the image has no FAB provider"
    )


def test_helm_executor_is_celery_with_keda_or_kubernetes(values, cluster_env):
    executor = values["executor"]
    assert executor in ("CeleryExecutor", "KubernetesExecutor"), f"{rel(HELM_VALUES)} executor: {executor!r}"
    assert executor == cluster_env["AIRFLOW__CORE__EXECUTOR"], (
        f"{rel(HELM_VALUES)} executor: {executor}, but infra/cluster.env's AIRFLOW__CORE__EXECUTOR is "
        f"{cluster_env['AIRFLOW__CORE__EXECUTOR']}"
    )
    if executor != "CeleryExecutor":
        return
    workers = values["workers"]
    keda = (workers.get("celery") or {}).get("keda") or workers.get("keda") or {}
    assert keda.get("enabled") is True, (
        f"{rel(HELM_VALUES)} workers.keda.enabled: KEDA must scale the Celery workers"
    )
    low, high = keda.get("minReplicaCount"), keda.get("maxReplicaCount")
    assert isinstance(low, int) and isinstance(high, int) and 1 <= low <= high, (
        f"{rel(HELM_VALUES)} workers.keda: minReplicaCount {low!r} and maxReplicaCount {high!r}, "
        "expected 1 <= min <= max"
    )
    assert not (workers.get("hpa") or {}).get("enabled"), f"{rel(HELM_VALUES)} workers.hpa: not with KEDA"


def test_helm_mlflow_server_env_and_service(mlflow_docs, cluster_env):
    kinds = {doc["kind"]: doc for doc in mlflow_docs}
    assert {"Deployment", "Service"} <= kinds.keys(), f"{rel(HELM_MLFLOW)}: has {sorted(kinds)}"
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    where = f"{rel(HELM_MLFLOW)} Deployment container {container['name']} env"
    rendered = render(cluster_env, HELM_ADDRESSES, rel(HELM_MLFLOW))
    # The server's part of cluster.env: MLflow's settings and boto3's for the artifact store.
    expected = {k: v for k, v in rendered.items() if k.startswith(("MLFLOW_", "AWS_"))}
    plain = {e["name"]: e.get("value") for e in container["env"] if "valueFrom" not in e}
    secret = {e["name"]: e["valueFrom"] for e in container["env"] if "valueFrom" in e}
    problems = env_problems(where, {**plain, **secret}, expected, SECRETS | MLFLOW_SERVER_ONLY)
    for name, source in secret.items():
        ref = source.get("secretKeyRef") or {}
        if name not in SECRETS or ref.get("name") != SECRET_NAME:
            problems.append(f"{where}: {name} comes from {source}, expected a secretKeyRef to {SECRET_NAME}")
    assert not problems, "\n".join(problems)

    args = [str(a) for a in container.get("args") or []]
    for ref in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert ref in plain, f"{rel(HELM_MLFLOW)} Deployment args: $({ref}) names no env entry"
    assert "--serve-artifacts" in args, f"{rel(HELM_MLFLOW)} Deployment args: --serve-artifacts is missing"
    url = urlsplit(HELM_ADDRESSES["mlflow"])
    patterns = args[args.index("--allowed-hosts") + 1].split(",") if "--allowed-hosts" in args else []
    assert any(fnmatch.fnmatch(url.netloc, p) for p in patterns), (
        f"{rel(HELM_MLFLOW)} Deployment args: --allowed-hosts must admit {url.netloc} (MLflow answers 403 otherwise)"
    )

    service = kinds["Service"]
    name, namespace = url.hostname.split(".")[:2]
    assert (service["metadata"]["name"], service["metadata"].get("namespace")) == (name, namespace), (
        f"{rel(HELM_MLFLOW)} Service: {service['metadata']}, but MLflow's address is {HELM_ADDRESSES['mlflow']}"
    )
    ports = [p["port"] for p in service["spec"]["ports"]]
    assert url.port in ports, f"{rel(HELM_MLFLOW)} Service ports {ports}: {url.port} is missing"
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), (
        f"{rel(HELM_MLFLOW)} Service selector {service['spec']['selector']} does not select the Deployment's pods"
    )


# --- the checks themselves --------------------------------------------------------------------------------


def test_a_drifted_environment_fails_naming_file_and_key(compose, cluster_env):
    where = f"{rel(COMPOSE)} services.airflow-scheduler.environment"
    expected = render(cluster_env, COMPOSE_ADDRESSES, rel(COMPOSE))
    env = dict(compose_env(compose, "airflow-scheduler"))
    assert not env_problems(where, env, expected, SECRETS)
    env["AIRFLOW__CELERY__BROKER_URL"] = "redis://elsewhere:6379/5"
    env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] = 1
    del env["SHRINKFLOW_LOCK_DB"]
    env["SOMETHING_ELSE"] = "x"
    problems = env_problems(where, env, expected, SECRETS)
    assert len(problems) == 4, problems
    for key in (
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY",
        "SHRINKFLOW_LOCK_DB",
        "SOMETHING_ELSE",
    ):
        assert [p for p in problems if re.match(rf"{re.escape(where)}: {key}[ =]", p)], (key, problems)


def test_a_placeholder_without_an_address_fails(tmp_path):
    env_file = tmp_path / "cluster.env"
    env_file.write_text("# comment\n\nA={pg}/x\nB={queue}\n")
    env = read_cluster_env(env_file)
    assert env == {"A": "{pg}/x", "B": "{queue}"}
    with pytest.raises(AssertionError, match=r"\{queue\}"):
        render(env, COMPOSE_ADDRESSES, "infra/compose.yaml")
