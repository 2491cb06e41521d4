"""Errors a user can hit. Each message names the problem and the fix."""


class ShrinkflowError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(ShrinkflowError):
    """pipelines.yaml (or a device registry) is unreadable or invalid."""


class UnknownPipelineError(ConfigError):
    """A pipeline name that pipelines.yaml does not declare."""


class DatasetError(ShrinkflowError):
    """A data source is missing or malformed."""


class ModelLoadError(ShrinkflowError):
    """A model factory, weights file or checkpoint cannot be loaded or does not match."""


class ModelNotRegisteredError(ModelLoadError):
    """model.weights names a registered model or alias the MLflow registry does not hold (yet)."""


class ArtifactError(ShrinkflowError):
    """A stage's input artifact is missing, corrupt or from another model."""


class StageError(ShrinkflowError):
    """A stage cannot run (unknown name, an earlier stage has not run)."""


class PipelineRunError(ShrinkflowError):
    """A task of a pipeline's DAG run failed."""


class TransientError(ShrinkflowError):
    """A service or device was unreachable; a retry may succeed."""


class DeviceError(TransientError):
    """A device (e.g. a TVM RPC server) cannot be reached or used."""


# Third-party errors that mean "a service did not answer", by qualified name: checking them needs no
# import of SQLAlchemy, requests or MLflow (the DAG file classifies failures with this module).
_TRANSIENT_TYPES = frozenset(
    {
        "sqlalchemy.exc.OperationalError",  # database unreachable, connection dropped, SQLite locked
        "sqlalchemy.exc.DisconnectionError",
        "sqlalchemy.exc.TimeoutError",  # connection pool exhausted
        "psycopg2.OperationalError",
        "requests.exceptions.ConnectionError",  # MLflow server down (MlflowException chains it)
        "requests.exceptions.Timeout",
        "requests.exceptions.RetryError",  # the server kept answering 5xx
        "urllib3.exceptions.MaxRetryError",
        "urllib3.exceptions.NewConnectionError",
        "urllib3.exceptions.ProtocolError",
    }
)
_TRANSIENT_MLFLOW_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})


def _is_service_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):  # refused, reset, socket timeouts
        return True
    if getattr(exc, "error_code", None) in _TRANSIENT_MLFLOW_CODES and type(exc).__name__ == "MlflowException":
        return True
    return any(f"{cls.__module__}.{cls.__qualname__}" in _TRANSIENT_TYPES for cls in type(exc).__mro__)


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: a TransientError, or a failure caused by a service or device not answering.

    A ConfigError never is, whatever caused it: the fix is in the configuration. Other errors count as
    transient when a service error is in their cause chain (e.g. an MlflowException raised while handling
    a refused connection).
    """
    if isinstance(exc, ConfigError):
        return False
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, TransientError) or _is_service_error(cur):
            return True
        # `raise X from None` says the earlier error is not the cause: do not follow it.
        cur = cur.__cause__ if cur.__cause__ is not None else None if cur.__suppress_context__ else cur.__context__
    return False


class ServiceError(TransientError):
    """A service a run needs (the Optuna study storage, the MLflow tracking server) does not answer."""
