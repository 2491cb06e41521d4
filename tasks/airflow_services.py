"""Airflow's components (and the MLflow UI) as child processes: started with shrinkflow's settings,
checked for health, and stopped leaving no process behind. `shrinkflow up` and the scheduler tests use it.

Finding every process to stop is the hard part. Airflow forks workers and task supervisors, and
`setproctitle` overwrites a process's /proc/<pid>/environ, so one marker does not find them all.
Each component starts in its own session (its descendants stay in it unless they call setsid), and
every child inherits SHRINKFLOW_UP_TOKEN=<uuid> (which processes that exec, such as a BashOperator's
setsid'd shell, keep in their environ). A process in one of those sessions, or carrying the token,
or descending from a component, is ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tasks.errors import ShrinkflowError
from tasks.orchestrate import AIRFLOW_PORT, MLFLOW_PORT, REPO_ROOT, airflow_env

TOKEN_VAR = "SHRINKFLOW_UP_TOKEN"
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# The health endpoint's key for each component that heartbeats (the API server answers it itself).
_HEALTH_KEYS = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}


class ServicesError(ShrinkflowError):
    """An Airflow or MLflow component did not start, or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def services_env(
    workspace: Path, *, pipelines: Path, api_port: int, token: str
) -> dict[str, str]:
    """The children's environment: shrinkflow's Airflow settings, sized to this machine, marked with `token`.

    Settings the user exported (AIRFLOW__*) win, except the ports this call was given.
    """
    env = {**os.environ, **airflow_env(workspace, pipelines=pipelines)}
    env.update(
        {
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            TOKEN_VAR: token,
            # Components start as `airflow ...` from PATH: make that this venv's airflow.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
    )
    cores = str(os.cpu_count() or 2)
    defaults = {
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # LocalExecutor forks `parallelism` workers at start (32 by default: 4 GB idle on a 2-core box).
        "AIRFLOW__CORE__PARALLELISM": cores,
        "AIRFLOW__API__WORKERS": "1",
        # The services' own logs are the point here, and INFO lets stage progress into the task logs.
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # The scheduler's and triggerer's log servers: free ports, so two workspaces can run side by side.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        # MLflow's job runner (GenAI evaluation jobs) is 8 huey processes that shrinkflow never uses.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.update({key: os.environ.get(key, value) for key, value in defaults.items()})
    return env


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session, start time) of a process from /proc/<pid>/stat; None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()  # the command name may hold spaces and parentheses
    return rest[0].decode(), int(rest[1]), int(rest[3]), int(rest[19])


def _carries(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not dumpable (Airflow's task processes): the session finds those
        return False


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        stat = _stat(pid)
        pid = stat[1] if stat else 0
    return pids


def find_processes(token: str, sessions: Iterable[int] = (), roots: Iterable[int] = ()) -> dict[int, int]:
    """Live processes (pid -> start time) in `sessions`, carrying `token`, or descending from `roots`."""
    sessions, marker, mine = set(sessions), f"{TOKEN_VAR}={token}".encode(), _ancestors()
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] not in ("Z", "X"):
            stats[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat[1], []).append(pid)
    found = {pid for pid, stat in stats.items() if stat[2] in sessions or _carries(pid, marker)}
    todo = [p for p in roots if p in stats]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return {pid: stats[pid][3] for pid in found - mine if pid in stats}


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class Services:
    """Started components: their processes, log files, and the URLs they serve."""

    workspace: Path
    env: dict[str, str]
    token: str
    api_url: str
    mlflow_url: str | None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    _files: list[IO[bytes]] = field(default_factory=list)
    _offsets: dict[str, int] = field(default_factory=dict)

    def ours(self) -> dict[int, int]:
        """Every live process these services started, at any depth (pid -> start time)."""
        pids = [p.pid for p in self.procs.values()]
        return find_processes(self.token, sessions=pids, roots=pids)

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode})" for n, p in self.procs.items() if p.poll() is not None]

    def logs_tail(self, lines: int = 30) -> str:
        """The last lines of each component's log, for error messages."""
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- {name} ({path}) ---\n" + "\n".join(text))
        return "\n".join(parts)

    def new_log_lines(self) -> Iterator[tuple[str, str]]:
        """(component, line) for each line the components logged since the last call."""
        for name, path in self.logs.items():
            with contextlib.suppress(OSError), open(path, "rb") as f:
                f.seek(self._offsets.get(name, 0))
                data = f.read()
                end = data.rfind(b"\n") + 1  # a half-written last line waits for the next call
                self._offsets[name] = self._offsets.get(name, 0) + end
                for line in data[:end].decode(errors="replace").splitlines():
                    yield name, line

    def health(self) -> dict[str, str]:
        """Each started component's state: healthy, or why not yet."""
        state = {name: "not answering" for name in self.procs}
        try:
            with urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=5) as r:
                body = json.load(r)
            if "api-server" in state:
                state["api-server"] = "healthy"
            for name, key in _HEALTH_KEYS.items():
                if name in state:
                    state[name] = (body.get(key) or {}).get("status") or "no heartbeat yet"
        except (OSError, ValueError):
            pass
        if self.mlflow_url:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.mlflow_url}/health", timeout=5) as r:
                    state["mlflow"] = "healthy" if r.status == 200 else f"HTTP {r.status}"
        return state

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until every component is healthy; ServicesError (with the logs' tails) if one dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if dead := self.dead():
                raise ServicesError(f"{', '.join(dead)} stopped while starting:\n{self.logs_tail()}")
            state = self.health()
            if all(s == "healthy" for s in state.values()):
                return
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{n}: {s}" for n, s in state.items() if s != "healthy")
                raise ServicesError(f"not healthy after {timeout:.0f} s ({waiting}):\n{self.logs_tail()}")
            time.sleep(1.0)

    def stop(self, grace: float = 20.0) -> list[int]:
        """Stop everything started here: SIGTERM, SIGKILL after `grace`; returns the pids that needed SIGKILL."""
        leaders = {p.pid for p in self.procs.values() if p.poll() is None}
        # The components first, so Airflow shuts its workers and tasks down in order; then the rest.
        _signal_all(leaders, signal.SIGTERM)
        self._wait_gone(grace / 2)
        _signal_all(self.ours(), signal.SIGTERM)
        left = self._wait_gone(grace / 2)
        killed = sorted(left)
        deadline = time.monotonic() + 15.0
        while left and time.monotonic() < deadline:
            _signal_all(left, signal.SIGKILL)  # anew each round: a dying parent may fork once more
            left = self._wait_gone(1.0)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for f in self._files:
            f.close()
        if left:
            raise ServicesError(f"processes {sorted(left)} survived SIGKILL (stuck in the kernel?)")
        return killed

    def _wait_gone(self, seconds: float) -> dict[int, int]:
        deadline = time.monotonic() + seconds
        while True:
            for proc in self.procs.values():
                proc.poll()  # reap our direct children, or they linger as zombies
            left = self.ours()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)


def _migrate(env: dict[str, str], log: Path) -> None:
    airflow = str(Path(sys.executable).with_name("airflow"))
    with open(log, "ab") as out:
        proc = subprocess.run([airflow, "db", "migrate"], env=env, cwd=REPO_ROOT, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600, start_new_session=True)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ServicesError(f"`airflow db migrate` failed (exit {proc.returncode}); {log}:\n{tail}")


def start_services(
    workspace: str | os.PathLike | None = None,
    *,
    config_path: str | os.PathLike | None = None,
    components: Iterable[str] = AIRFLOW_COMPONENTS,
    api_port: int | None = None,
    mlflow_port: int | None = None,
    mlflow: bool = True,
) -> Services:
    """Migrate the metadata DB, then start each component (own session, logs under airflow/logs/services)."""
    from tasks.config import pipelines_path
    from tasks.workspace import workspace_root

    ws = workspace_root(workspace).resolve()
    api_port = api_port or int(os.environ.get("AIRFLOW__API__PORT", AIRFLOW_PORT))
    token = os.environ.get(TOKEN_VAR) or uuid.uuid4().hex  # set by a caller that wants to find them too
    env = services_env(ws, pipelines=pipelines_path(config_path).resolve(), api_port=api_port, token=token)
    log_dir = Path(env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]) / "services"
    log_dir.mkdir(parents=True, exist_ok=True)
    mlflow_port = mlflow_port or MLFLOW_PORT
    services = Services(ws, env, token, f"http://127.0.0.1:{api_port}",
                        f"http://127.0.0.1:{mlflow_port}" if mlflow else None)
    airflow = str(Path(sys.executable).with_name("airflow"))
    commands = {name: [airflow, name] for name in components}
    if mlflow:
        commands["mlflow"] = [
            str(Path(sys.executable).with_name("mlflow")), "ui",
            "--backend-store-uri", f"sqlite:///{ws / 'mlflow.db'}",
            "--default-artifact-root", str(ws / "mlartifacts"),
            "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--workers", "1",  # the default 4 is a lot for one user on a small machine
        ]
    try:
        _migrate(env, log_dir / "db-migrate.log")  # before the components: they refuse an empty DB
        for name, cmd in commands.items():
            services.logs[name] = log_dir / f"{name}.log"
            out = open(services.logs[name], "ab")  # closed by stop()
            services._offsets[name] = out.tell()
            services._files.append(out)
            # Own session: Ctrl-C in the terminal reaches `up` only, which then stops them in order.
            services.procs[name] = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True)
    except BaseException:
        services.stop(grace=5.0)
        raise
    return services


def read_admin_password(services: Services) -> str | None:
    """The simple auth manager's generated password for `admin` (written once the API server is up)."""
    path = Path(services.env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
                or Path(services.env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated")
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text()).get("admin")
    return None


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def up(
    workspace: str | os.PathLike | None = None,
    *,
    config_path: str | os.PathLike | None = None,
    port: int | None = None,
    mlflow_port: int | None = None,
) -> int:
    """Run Airflow (api-server, scheduler, dag-processor, triggerer) and the MLflow UI until Ctrl-C."""
    # Our handlers, not an inherited SIG_IGN (a shell's background job), so Ctrl-C and `kill` reach us.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    services: Services | None = None
    try:
        services = start_services(workspace, config_path=config_path, api_port=port, mlflow_port=mlflow_port)
        print(f"Starting Airflow ({', '.join(AIRFLOW_COMPONENTS)}; parallelism "
              f"{services.env['AIRFLOW__CORE__PARALLELISM']}) and MLflow; their logs: "
              f"{services.logs['scheduler'].parent}", flush=True)
        ready = False
        while not (dead := services.dead()):
            for name, line in services.new_log_lines():
                print(f"{name:13s} | {line}", flush=True)
            if not ready and all(s == "healthy" for s in services.health().values()):
                ready = True
                print(f"\nAirflow  {services.api_url}  (user admin, password {read_admin_password(services)})\n"
                      f"MLflow   {services.mlflow_url}\nWorkspace {services.workspace}\nCtrl-C stops both.\n",
                      flush=True)
            time.sleep(0.5 if ready else 1.0)
        print(f"shrinkflow up: {', '.join(dead)} stopped; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nshrinkflow up: stopping Airflow and MLflow ...", file=sys.stderr, flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the stop short and leave orphans; stop() escalates to SIGKILL itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if services is not None:
            killed = services.stop()
            how = f"; killed {len(killed)} that ignored SIGTERM" if killed else ""
            print(f"shrinkflow up: every process stopped{how}", file=sys.stderr, flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
