"""Is a service a run needs reachable? The Optuna study storage and the MLflow tracking server, each
asked once with a bounded wait, so a dead one is reported in seconds with its URL and the fix."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tasks.errors import ConfigError, ServiceError

TIMEOUT_S = 10.0
# Drivers whose connect call takes a timeout (libpq, MySQL clients); others rely on the thread bound.
_CONNECT_TIMEOUT_ARG = {"postgresql": "connect_timeout", "mysql": "connect_timeout"}


def redact(url: str) -> str:
    """The URL with any password replaced by ***, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _reason(err: BaseException) -> str:
    """The useful part of a driver's or HTTP client's error: 'Connection refused', not its whole repr."""
    text = str(getattr(err, "orig", None) or err)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno.group(1).strip()
    return text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__


def within(seconds: float, fn: Callable[[], Any], what: str, fix: str) -> Any:
    """fn() in a helper thread; a ServiceError if it has not answered after `seconds` (the thread is left
    to its own timeout: a hung socket cannot be cancelled from here)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=call, daemon=True, name=f"shrinkflow-check {what}")
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise ServiceError(f"{what}: no answer within {seconds:.0f} s. {fix}")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_database(url: str, what: str, fix: str, timeout_s: float = TIMEOUT_S) -> str:
    """Connect to a database URL and run SELECT 1; returns a one-line description."""
    import sqlalchemy as sa

    shown = redact(url)
    backend = url.split(":", 1)[0].split("+", 1)[0]
    connect_args = {_CONNECT_TIMEOUT_ARG[backend]: max(1, int(timeout_s))} if backend in _CONNECT_TIMEOUT_ARG else {}
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=connect_args)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError, ValueError) as e:
        raise ConfigError(f"{what} {shown} is not a usable database URL ({_reason(e)}). {fix}") from e

    def probe() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    try:
        within(timeout_s + 1, probe, f"{what} {shown}", fix)
    except sa.exc.SQLAlchemyError as e:
        raise ServiceError(f"{what} {shown} is unreachable: {_reason(e)}. {fix}") from None
    finally:
        engine.dispose()
    return f"{what} {shown}: reachable"


def check_mlflow_server(uri: str, timeout_s: float = TIMEOUT_S) -> str:
    """Ask an MLflow tracking server (http/https) for one experiment, once, within timeout_s."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    fix = ("Start the server (`mlflow server --host 127.0.0.1 --port 5000`), fix $MLFLOW_TRACKING_URI, or unset "
           "it to track in the workspace's SQLite database")
    shown = f"MLflow tracking server {redact(uri)} ($MLFLOW_TRACKING_URI)"

    def ask():
        return http_request(
            get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
            json={"max_results": 1}, max_retries=0, timeout=max(1, int(timeout_s)),
        )

    try:
        response = within(timeout_s + 1, ask, shown, fix)
    except MlflowException as e:
        raise ServiceError(f"{shown} is unreachable: {_reason(e.__cause__ or e)}. {fix}") from None
    if response.status_code in (401, 403):
        raise ConfigError(
            f"{shown} refused the credentials (HTTP {response.status_code}); set MLFLOW_TRACKING_USERNAME/"
            "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
        )
    if response.status_code == 404:
        raise ConfigError(f"{shown} has no MLflow tracking API (HTTP 404); check the URL (host, port, path prefix)")
    if response.status_code >= 400:
        raise ServiceError(f"{shown} answered HTTP {response.status_code}: {response.text[:200]}. {fix}")
    return f"{shown}: reachable"


def check_tracking(uri: str | None, timeout_s: float = TIMEOUT_S) -> str:
    """The MLflow tracking URI a run will use: a server or a database is asked; a local store is not."""
    if not uri:
        return "MLflow: SQLite in the workspace"
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("http", "https"):
        return check_mlflow_server(uri, timeout_s)
    if scheme in ("postgresql", "mysql", "mssql"):
        return check_database(
            uri, "MLflow tracking database ($MLFLOW_TRACKING_URI)",
            "Start the database, fix $MLFLOW_TRACKING_URI, or unset it to track in the workspace", timeout_s,
        )
    return f"MLflow: {redact(uri)} (local store, not probed)"
