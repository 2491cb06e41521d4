"""Where stage progress lines go: stderr from a terminal, the task log (levels kept) under Airflow."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tasks.progress import in_supervised_airflow_task, say

REPO = Path(__file__).resolve().parents[2]


def test_outside_airflow_lines_go_to_stderr_as_before(capsys):
    say("base epoch 1: val accuracy 50.00%")
    say("the goal check will say NOT met", logging.WARNING)
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "[shrinkflow] base epoch 1: val accuracy 50.00%\n[shrinkflow] warning: the goal check will say NOT met\n"
    assert not in_supervised_airflow_task()


# A supervised Airflow task, as the task runner's child sets it up (supervisor._fork_main): logging sends
# JSON over a channel to the supervisor, fd 2 is a socket the supervisor logs as task.stderr at
# level error, and task_runner.main has set SUPERVISOR_COMMS.
_CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    from airflow.sdk.execution_time import supervisor, task_runner
    from airflow.sdk.execution_time.comms import CommsDecoder

    log_ours, log_theirs = socket.socketpair()
    err_ours, err_theirs = socket.socketpair()
    req_ours, req_theirs = socket.socketpair()
    out = os.fdopen(os.dup(1), "w")
    supervisor._configure_logs_over_json_channel(log_theirs.fileno())
    os.dup2(err_theirs.fileno(), 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    task_runner.SUPERVISOR_COMMS = CommsDecoder(socket=req_theirs)

    from tasks.progress import in_supervised_airflow_task, say
    say("base epoch 1: val accuracy 50.00%")
    say("the goal check will say NOT met", 30)
    sys.stderr.flush()
    log_theirs.close(); err_theirs.close(); os.close(2)
    records = [json.loads(line) for line in log_ours.makefile("rb").read().splitlines()]
    stderr = err_ours.makefile("rb").read().decode()
    out.write(json.dumps({"records": records, "stderr": stderr, "supervised": in_supervised_airflow_task()}))
    """
)


def test_in_a_supervised_airflow_task_lines_reach_the_task_log_with_their_level(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__LOGGING__LOGGING_LEVEL="INFO", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["supervised"] is True
    assert got["stderr"] == ""  # nothing on the stream Airflow logs as "level":"error"
    ours = [(r["level"], r["event"]) for r in got["records"] if r.get("logger") == "shrinkflow"]
    assert ours == [("info", "base epoch 1: val accuracy 50.00%"), ("warning", "the goal check will say NOT met")]
