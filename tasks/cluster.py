"""The scale-out topology as processes on 127.0.0.1 (`infra/local-cluster.sh up|down|status`).

The same settings as the deployment files (infra/compose.yaml, infra/helm/values.yaml): infra/cluster.env,
its {placeholders} filled with this machine's addresses. Started here:
  - moto's S3 server (standing in for S3 or MinIO): the buckets of MLflow's artifacts and the workspace;
  - an MLflow tracking server: PostgreSQL backend store, S3 artifact store served through the server;
  - Airflow's api-server, scheduler, dag-processor and triggerer on the PostgreSQL metadata DB;
  - N Celery workers on the Redis broker, each in its own folder with its own local workspace (a cache
    of the object store) and name, sharing nothing but the object store and the services.
PostgreSQL and Redis are the machine's own (127.0.0.1:5432, :6379); `up` gives the cluster fresh
databases (shrinkflow_airflow, _mlflow, _optuna) and a flushed Redis database 5.

Each component starts in its own session with SHRINKFLOW_UP_TOKEN=<token> in its environment; `down`
finds every process by those (tasks/airflow_services.find_processes) and stops them, SIGKILL last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tasks.airflow_services import _HEALTH_KEYS, TOKEN_VAR, _signal_all, _stat, find_processes, free_port
from tasks.errors import ConfigError, ServiceError, ShrinkflowError
from tasks.object_store import worker_name

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_ENV = REPO_ROOT / "infra" / "cluster.env"
PG, REDIS = "127.0.0.1:5432", "127.0.0.1:6379"
PORTS = {"api": 8180, "mlflow": 5100, "s3": 9100}  # away from `shrinkflow up`'s 8080 and 5000
DATABASES = ("shrinkflow_airflow", "shrinkflow_mlflow", "shrinkflow_optuna")
REDIS_DB = 5
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# Test credentials of the local S3 (moto accepts any); a real deployment supplies its own.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "shrinkflow", "AWS_SECRET_ACCESS_KEY": "shrinkflow-local"}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class ClusterError(ShrinkflowError):
    """The local cluster did not start, or is not in the state a command needs."""


# Airflow's [core] hostname_callable (infra/cluster.env): the worker's name ($SHRINKFLOW_WORKER_NAME), else
# the host name, so each task instance records the worker that ran it; the same name signs published folders.
worker_hostname = worker_name


def read_cluster_env(path: Path = CLUSTER_ENV) -> dict[str, str]:
    """infra/cluster.env as KEY -> value, placeholders kept."""
    env = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"{path}:{n}: expected KEY=value, got {line!r}")
        env[key] = value
    return env


def render(env: dict[str, str], addresses: dict[str, str]) -> dict[str, str]:
    """The settings with {pg}, {redis}, {s3}, {mlflow}, {api} replaced by one deployment's addresses."""

    def fill(m: re.Match) -> str:
        if m.group(1) not in addresses:
            raise ConfigError(f"{CLUSTER_ENV}: no address for {{{m.group(1)}}}; known: {', '.join(addresses)}")
        return addresses[m.group(1)]

    return {k: _PLACEHOLDER.sub(fill, v) for k, v in env.items()}


def local_addresses(ports: dict[str, int] = PORTS) -> dict[str, str]:
    return {"pg": PG, "redis": REDIS, "s3": f"http://127.0.0.1:{ports['s3']}",
            "mlflow": f"http://127.0.0.1:{ports['mlflow']}", "api": f"http://127.0.0.1:{ports['api']}"}


def state_dir() -> Path:
    return Path(os.environ.get("SHRINKFLOW_CLUSTER_DIR") or REPO_ROOT / ".shrinkflow" / "cluster").resolve()


def _state_file(sd: Path) -> Path:
    return sd / "cluster.json"


def read_state(sd: Path | None = None) -> dict[str, Any] | None:
    f = _state_file(sd or state_dir())
    return json.loads(f.read_text()) if f.is_file() else None


def _secrets(sd: Path) -> dict[str, str]:
    """Airflow's JWT secret and Fernet key, generated once per cluster folder (every component shares them)."""
    f = sd / "secrets.json"
    if not f.is_file():
        from cryptography.fernet import Fernet

        f.write_text(json.dumps({"AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                                 "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode()}))
        f.chmod(0o600)
    return json.loads(f.read_text())


def cluster_environment(sd: Path, pipelines: Path, ports: dict[str, int] = PORTS) -> dict[str, str]:
    """The environment every component starts with: cluster.env for this machine, the secrets, the paths."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "MLFLOW_", "SHRINKFLOW_"))}
    env.update(render(read_cluster_env(), local_addresses(ports)))
    env.update(_secrets(sd))
    env.update(S3_CREDENTIALS)
    home = sd / "airflow"
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(ports["api"]),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "SHRINKFLOW_PIPELINES": str(pipelines),
        "SHRINKFLOW_HOME": str(sd / "control" / "workspace"),  # the api-server's and scheduler's (parsing only)
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    })
    return env


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _services_ready() -> None:
    """PostgreSQL and Redis answer, or a clear error naming the one that does not."""
    from tasks.services import check_database

    check_database(f"postgresql+psycopg2://postgres@{PG}/postgres", "PostgreSQL",
                   "Start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
    import redis

    try:
        redis.Redis.from_url(f"redis://{REDIS}/{REDIS_DB}", socket_connect_timeout=5).ping()
    except redis.exceptions.RedisError as e:
        raise ServiceError(f"Redis {REDIS} is unreachable ({e}). Start it: redis-server --daemonize yes "
                           "--bind 127.0.0.1 --port 6379 --save '' --appendonly no") from None


def _fresh_databases() -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=10)
    conn.autocommit = True
    with conn.cursor() as cur:
        for db in DATABASES:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                        "AND pid <> pg_backend_pid()", (db,))
            cur.execute(f'DROP DATABASE IF EXISTS "{db}"')
            cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()
    import redis

    redis.Redis.from_url(f"redis://{REDIS}/{REDIS_DB}", socket_connect_timeout=5).flushdb()


def _buckets(env: dict[str, str]) -> list[str]:
    return sorted({v.removeprefix("s3://").split("/", 1)[0] for v in env.values() if v.startswith("s3://")})


def _spawn(log: Path, cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    """Start a detached component: its own session, stdin closed, output appended to `log`; its pid."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


class _Starter:
    """Starts components detached (own session, the token in their environment), logging to files."""

    def __init__(self, sd: Path, env: dict[str, str], token: str) -> None:
        self.sd, self.env, self.token = sd, {**env, TOKEN_VAR: token}, token
        self.logs = sd / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids: dict[str, int] = {}
        self.commands: dict[str, dict[str, Any]] = {}  # how each was started: `restart` starts it again

    def start(self, name: str, cmd: list[str], extra: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> None:
        self.commands[name] = {"cmd": cmd, "extra": extra or {}, "cwd": str(cwd)}
        self.pids[name] = _spawn(self.logs / f"{name}.log", cmd, {**self.env, **(extra or {})}, cwd)

    def run(self, name: str, cmd: list[str], timeout: float) -> None:
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.run(cmd, env=self.env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, start_new_session=True)
        if proc.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd[-3:])}` failed (exit {proc.returncode}):\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 25) -> str:
        f = self.logs / f"{name}.log"
        text = f.read_text(errors="replace").splitlines()[-lines:] if f.is_file() else []
        return f"--- {f} ---\n" + "\n".join(text)


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def worker_names(n: int) -> list[str]:
    return [f"worker-{i + 1}" for i in range(n)]


def up(workers: int = 2, timeout: float = 600.0, pipelines: str | os.PathLike | None = None) -> dict[str, Any]:
    """Start a fresh cluster (new databases, empty buckets); returns its state (also in cluster.json)."""
    from tasks.config import pipelines_path

    sd = state_dir()
    if (st := read_state(sd)) is not None and _alive(st):
        raise ClusterError(f"a cluster is already up (state {_state_file(sd)}); `infra/local-cluster.sh down` first")
    for name, port in PORTS.items():
        if _port_open(port):
            raise ClusterError(f"port {port} ({name}) is taken on 127.0.0.1: stop what listens there "
                               "(`shrinkflow up`? an earlier cluster?) and try again")
    _services_ready()
    import shutil

    for sub in ("airflow", "control", "logs", *worker_names(8)):
        shutil.rmtree(sd / sub, ignore_errors=True)
    sd.mkdir(parents=True, exist_ok=True)
    pipelines_file = pipelines_path(pipelines).resolve()
    env = cluster_environment(sd, pipelines_file)
    env["SHRINKFLOW_SEARCH_WORKERS"] = str(workers)  # the DAGs fan the search out to every worker
    token = uuid.uuid4().hex
    starter = _Starter(sd, env, token)
    state = {"token": token, "pids": starter.pids, "commands": starter.commands, "ports": PORTS, "workers": worker_names(workers),
             "pipelines": str(pipelines_file), "state_dir": str(sd), "started": time.time(),
             "api_url": local_addresses()["api"], "mlflow_url": env["MLFLOW_TRACKING_URI"],
             "s3_url": env["AWS_ENDPOINT_URL"], "artifacts": env["SHRINKFLOW_ARTIFACTS"]}
    try:
        _fresh_databases()
        starter.start("s3", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(PORTS["s3"])])
        _wait(lambda: _port_open(PORTS["s3"]), 60, "moto's S3 server", starter, "s3")
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        for bucket in _buckets(env):
            s3.create_bucket(Bucket=bucket)
        starter.start("mlflow", [_bin("mlflow"), "server", "--backend-store-uri", env["MLFLOW_BACKEND_STORE_URI"],
                                 "--artifacts-destination", env["MLFLOW_ARTIFACTS_DESTINATION"], "--serve-artifacts",
                                 "--host", "127.0.0.1", "--port", str(PORTS["mlflow"]), "--workers", "1"])
        starter.run("db-migrate", [_bin("airflow"), "db", "migrate"], timeout=600)
        for name in AIRFLOW_COMPONENTS:
            starter.start(name, [_bin("airflow"), name])
        threads = str(max(1, (os.cpu_count() or 2) // workers))  # the workers share the cores, not fight for them
        for name in worker_names(workers):
            starter.start(name, [_bin("airflow"), "celery", "worker", "--celery-hostname", f"{name}@%h",
                                 "--concurrency", "1"],
                          extra={"SHRINKFLOW_WORKER_NAME": name, "SHRINKFLOW_HOME": str(sd / name / "workspace"),
                                 "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                                 "OMP_NUM_THREADS": threads, "TVM_NUM_THREADS": threads},
                          cwd=sd / name)
        _state_file(sd).write_text(json.dumps(state, indent=2))
        _wait_healthy(state, starter, timeout)
    except BaseException:
        _state_file(sd).write_text(json.dumps(state, indent=2))
        down()
        raise
    return state


def _wait(ok, timeout: float, what: str, starter: _Starter, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not ready after {timeout:.0f} s:\n{starter.tail(log)}")
        time.sleep(0.5)


def health(state: dict[str, Any]) -> dict[str, str]:
    """Each component: healthy, or why not (dead process, no heartbeat, not answering)."""
    out: dict[str, str] = {}
    for name, pid in state["pids"].items():
        out[name] = "running" if _pid_alive(pid) else "stopped"
    try:
        with urllib.request.urlopen(f"{state['api_url']}/api/v2/monitor/health", timeout=5) as r:
            body = json.load(r)
        if out.get("api-server") == "running":
            out["api-server"] = "healthy"
        for name, key in _HEALTH_KEYS.items():
            if out.get(name) == "running":
                out[name] = (body.get(key) or {}).get("status") or "no heartbeat yet"
    except (OSError, ValueError):
        pass
    if out.get("mlflow") == "running":
        try:
            with urllib.request.urlopen(f"{state['mlflow_url']}/health", timeout=5) as r:
                out["mlflow"] = "healthy" if r.status == 200 else f"HTTP {r.status}"
        except OSError:
            out["mlflow"] = "not answering"
    if out.get("s3") == "running":
        out["s3"] = "healthy" if _port_open(state["ports"]["s3"]) else "not answering"
    sd = Path(state["state_dir"])
    for name in state["workers"]:
        if out.get(name) == "running":
            log = sd / "logs" / f"{name}.log"
            text = log.read_bytes()[state.get("log_offsets", {}).get(name, 0):].decode(errors="replace") \
                if log.is_file() else ""
            out[name] = "healthy" if f"{name}@" in text and " ready." in text else "starting"  # Celery's banner
    return out


def _wait_healthy(state: dict[str, Any], starter: _Starter, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        h = health(state)
        if dead := [n for n, s in h.items() if s == "stopped"]:
            raise ClusterError(f"{', '.join(dead)} stopped while starting:\n" + "\n".join(starter.tail(n) for n in dead))
        if all(s == "healthy" for s in h.values()):
            return
        if time.monotonic() > deadline:
            waiting = {n: s for n, s in h.items() if s != "healthy"}
            raise ClusterError(f"not healthy after {timeout:.0f} s: {waiting}\n" + "\n".join(
                starter.tail(n) for n in waiting))
        time.sleep(2)


def _pid_alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _alive(state: dict[str, Any]) -> bool:
    return any(_pid_alive(p) for p in state["pids"].values())


def processes(state: dict[str, Any], only: str | None = None) -> dict[int, int]:
    """The live processes of the cluster (or of one component) at any depth."""
    pids = [p for n, p in state["pids"].items() if only in (None, n)]
    if only is not None:
        return find_processes(uuid.uuid4().hex, sessions=pids, roots=pids)  # its session and descendants
    return find_processes(state["token"], sessions=pids, roots=pids)


def kill(state: dict[str, Any], component: str, sig: signal.Signals = signal.SIGKILL) -> list[int]:
    """Signal every process of one component (a worker's whole tree: what a lost machine looks like)."""
    pids = sorted(processes(state, component))
    _signal_all(pids, sig)
    return pids


def stop_component(state: dict[str, Any], component: str, grace: float = 15.0) -> None:
    """Stop one component (SIGTERM, SIGKILL after `grace`), e.g. to take the MLflow server away for a while."""
    kill(state, component, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while processes(state, component) and time.monotonic() < deadline:
        time.sleep(0.3)
    kill(state, component, signal.SIGKILL)


def restart(state: dict[str, Any], component: str, timeout: float = 300.0) -> None:
    """Start a stopped (or killed) component again as `up` started it, and wait until it is healthy."""
    if processes(state, component):
        raise ClusterError(f"{component} is still running; stop it first")
    sd = Path(state["state_dir"])
    how = state.get("commands", {}).get(component)
    if how is None:
        raise ClusterError(f"the cluster's state does not say how {component} was started (an older "
                           "local-cluster.sh started it): `infra/local-cluster.sh down`, then `up`")
    env = {**cluster_environment(sd, Path(state["pipelines"])), TOKEN_VAR: state["token"],
           "SHRINKFLOW_SEARCH_WORKERS": str(len(state["workers"])), **how["extra"]}
    if component in state["workers"]:
        env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(free_port())
    log = sd / "logs" / f"{component}.log"
    state.setdefault("log_offsets", {})[component] = log.stat().st_size if log.is_file() else 0  # health reads on
    state["pids"][component] = _spawn(log, how["cmd"], env, Path(how["cwd"]))
    _state_file(sd).write_text(json.dumps(state, indent=2))
    deadline = time.monotonic() + timeout
    while (h := health(state)[component]) != "healthy":
        if h == "stopped" or time.monotonic() > deadline:
            raise ClusterError(f"{component} did not come back ({h}); see {sd / 'logs' / f'{component}.log'}")
        time.sleep(1)


def down(grace: float = 20.0) -> list[int]:
    """Stop every process of the cluster (SIGTERM, SIGKILL after `grace`); the pids that needed SIGKILL."""
    sd = state_dir()
    state = read_state(sd)
    if state is None:
        return []
    _signal_all(processes(state), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := processes(state)) and time.monotonic() < deadline:
        time.sleep(0.3)
    killed = sorted(left)
    for _ in range(20):
        if not (left := processes(state)):
            break
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.5)
    if left := processes(state):
        raise ClusterError(f"processes {sorted(left)} survived SIGKILL")
    _state_file(sd).unlink(missing_ok=True)
    return killed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infra/local-cluster.sh", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start a fresh cluster and wait until every component is healthy")
    u.add_argument("--workers", type=int, default=2)
    u.add_argument("--timeout", type=float, default=600)
    u.add_argument("--pipelines", help="the pipelines file the DAGs come from (default $SHRINKFLOW_PIPELINES "
                   "or pipelines.yaml)")
    sub.add_parser("down", help="stop every process of the cluster")
    sub.add_parser("status", help="each component's state; exit 1 unless all are healthy")
    sub.add_parser("env", help="print the cluster's environment as export lines (for a shell or a test)")
    for verb in ("stop", "restart"):
        sub.add_parser(verb, help=f"{verb} one component (e.g. mlflow, worker-1)").add_argument("component")
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            st = up(args.workers, args.timeout, args.pipelines)
            print(f"cluster up: Airflow {st['api_url']}, MLflow {st['mlflow_url']}, S3 {st['s3_url']}, "
                  f"workers {', '.join(st['workers'])}; logs in {Path(st['state_dir']) / 'logs'}")
            return 0
        if args.cmd == "down":
            killed = down()
            print("cluster down" + (f" (killed {len(killed)} that ignored SIGTERM)" if killed else ""))
            return 0
        st = read_state()
        if st is None:
            print("no cluster is up (infra/local-cluster.sh up starts one)")
            return 1
        if args.cmd == "env":
            env = cluster_environment(Path(st["state_dir"]), Path(st["pipelines"]))
            keys = [*read_cluster_env(), *S3_CREDENTIALS, "SHRINKFLOW_PIPELINES", "AIRFLOW_HOME"]
            print("\n".join(f"export {k}='{env[k]}'" for k in keys))
            return 0
        if args.cmd in ("stop", "restart"):
            if args.component not in st["pids"]:
                raise ClusterError(f"no component {args.component!r}; components: {', '.join(st['pids'])}")
            stop_component(st, args.component) if args.cmd == "stop" else restart(st, args.component)
            print(f"{args.component}: {'stopped' if args.cmd == 'stop' else 'healthy'}")
            return 0
        h = health(st)
        for name, s in h.items():
            print(f"{name:14s} {s}")
        return 0 if all(s == "healthy" for s in h.values()) else 1
    except ShrinkflowError as e:
        print(f"local-cluster: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
