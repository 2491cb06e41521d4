"""Which failures are worth a retry: services and devices not answering, never a configuration error."""

from __future__ import annotations

import pytest

from tasks.errors import (
    ConfigError,
    DatasetError,
    DeviceError,
    ShrinkflowError,
    StageError,
    TransientError,
    is_transient,
)


def _raised(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the test inspects what was raised
        return e
    raise AssertionError("nothing raised")


def _unreachable_database():
    import sqlalchemy

    sqlalchemy.create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/test").connect()


def _unreachable_http():
    import requests

    requests.get("http://127.0.0.1:1/api/2.0/mlflow/experiments/list", timeout=5)


def test_device_errors_are_transient() -> None:
    assert issubclass(DeviceError, TransientError) and issubclass(TransientError, ShrinkflowError)
    assert is_transient(DeviceError("device 'rk3588' (127.0.0.1:9190): 3 tries failed"))


def test_real_service_failures_are_transient() -> None:
    db = _raised(_unreachable_database)
    assert type(db).__name__ == "OperationalError" and is_transient(db)
    http = _raised(_unreachable_http)
    assert is_transient(http)
    assert is_transient(_raised(lambda: __import__("socket").create_connection(("127.0.0.1", 1), timeout=5)))


def test_errors_raised_while_a_service_was_down_are_transient() -> None:
    """MLflow raises MlflowException inside `except` (no `from`): the refused connection is its context."""
    from mlflow.exceptions import MlflowException

    def mlflow_call():
        try:
            _unreachable_http()
        except Exception as e:
            raise MlflowException(f"API request to http://127.0.0.1:1 failed with exception {e}")  # noqa: B904

    assert is_transient(_raised(mlflow_call))

    def stage_over_db():
        try:
            _unreachable_database()
        except Exception as e:
            raise StageError("study storage unreachable") from e

    assert is_transient(_raised(stage_over_db))


@pytest.mark.parametrize(
    "exc",
    [ConfigError("goal.speedup: greater than 1"), DatasetError("no such folder"), StageError("run it first"),
     RuntimeError("a bug"), ValueError("bad shape")],
)
def test_other_errors_are_not_transient(exc) -> None:
    assert not is_transient(exc)


def test_a_config_error_is_never_transient_whatever_caused_it() -> None:
    def config_over_db():
        try:
            _unreachable_database()
        except Exception as e:
            raise ConfigError("search.storage points nowhere") from e

    assert not is_transient(_raised(config_over_db))

    def suppressed():
        try:
            _unreachable_database()
        except Exception:
            raise StageError("not a service problem") from None

    assert not is_transient(_raised(suppressed))
