"""`shrinkflow up` starts Airflow's components and MLflow, and Ctrl-C leaves none of their processes behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tasks.airflow_services import TOKEN_VAR, Services, _stat, find_processes, free_port, services_env

REPO = Path(__file__).resolve().parents[2]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"


def _still_alive(seen: dict[int, int]) -> dict[int, str]:
    """Those of `seen` (pid -> start time) that still run: same pid, same start time."""
    return {pid: _cmdline(pid) for pid, start in seen.items()
            if (st := _stat(pid)) and st[3] == start and st[0] not in ("Z", "X")}


def test_services_env_sizes_airflow_to_the_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("AIRFLOW__CORE__PARALLELISM", raising=False)
    env = services_env(tmp_path, pipelines=tmp_path / "p.yaml", api_port=18080, token="t")
    assert env["AIRFLOW__CORE__PARALLELISM"] == str(os.cpu_count())
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert env[TOKEN_VAR] == "t" and env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    monkeypatch.setenv("AIRFLOW__CORE__PARALLELISM", "7")  # the user's choice wins
    assert services_env(tmp_path, pipelines=tmp_path / "p.yaml", api_port=1, token="t")[
        "AIRFLOW__CORE__PARALLELISM"] == "7"


def test_find_processes_sees_a_setsid_grandchild_by_its_token(tmp_path):
    token = uuid.uuid4().hex
    env = {**os.environ, TOKEN_VAR: token}
    # A child that starts a grandchild in a new session and exits: only the token still finds it.
    child = subprocess.run(
        [sys.executable, "-c", "import subprocess; p = subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, "
         "start_new_session=True); print(p.pid)"], env=env, capture_output=True, text=True, timeout=60)
    grandchild = int(child.stdout)
    try:
        assert grandchild in find_processes(token)
        assert grandchild not in find_processes(uuid.uuid4().hex)
    finally:
        os.kill(grandchild, signal.SIGKILL)


_STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "if sys.argv[1] == 'parent':\n"
    "    subprocess.Popen([sys.executable, '-c', sys.argv[2], 'orphan', sys.argv[2]], start_new_session=True)\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


def test_stop_kills_what_ignores_sigterm_including_a_setsid_descendant(tmp_path):
    token = uuid.uuid4().hex
    env = {**os.environ, TOKEN_VAR: token}
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN, "parent", _STUBBORN], env=env,
                            stdout=subprocess.DEVNULL, start_new_session=True)
    services = Services(tmp_path, env, token, "http://127.0.0.1:1", None, procs={"stubborn": proc})
    try:
        deadline = time.monotonic() + 60
        while len(services.ours()) < 2:  # the parent and its orphan-to-be in its own session
            assert time.monotonic() < deadline, services.ours()
            time.sleep(0.2)
        before = services.ours()
        killed = services.stop(grace=1.0)
        assert set(killed) == set(before) and len(killed) == 2
        assert not find_processes(token) and proc.returncode == -signal.SIGKILL
    finally:
        for pid in find_processes(token):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_up_stops_every_process_it_started(tmp_path):
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "SHRINKFLOW"))}
    env.update({TOKEN_VAR: token, "PYTHONPATH": str(REPO)})
    log = tmp_path / "up.log"
    shrinkflow = Path(sys.executable).with_name("shrinkflow")
    cmd = [str(shrinkflow), "--workspace", str(tmp_path / "ws"), "up",
           "--port", str(free_port()), "--mlflow-port", str(free_port())]
    with open(log, "wb") as out:
        up = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 400
        while b"Ctrl-C stops both" not in log.read_bytes():  # printed once every component is healthy
            assert up.poll() is None, f"shrinkflow up exited ({up.returncode}):\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, f"not ready in 400 s:\n{log.read_text()[-5000:]}"
            time.sleep(2)
        tree = find_processes(token, roots=[up.pid])
        sessions = {st[2] for pid in tree if pid != up.pid and (st := _stat(pid))}
        seen = find_processes(token, sessions=sessions, roots=[up.pid])
        seen.pop(up.pid, None)
        names = " ".join(_cmdline(p) for p in seen)
        for part in ("api_server", "scheduler", "dag-processor", "triggerer", "LocalExecutor", "mlflow"):
            assert part in names, f"{part} not among up's processes: {names}"

        up.send_signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(timeout=120) == 0, log.read_text()[-5000:]
        left = _still_alive(seen)
        left.update({p: _cmdline(p) for p in find_processes(token, sessions=sessions)})
        assert not left, f"left running after Ctrl-C: {left}\n{log.read_text()[-3000:]}"
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                up.wait(120)
        if up.poll() is None:
            up.kill()
            up.wait(10)
        for pid in _still_alive(seen):  # never leave them to the next test
            os.kill(pid, signal.SIGKILL)
