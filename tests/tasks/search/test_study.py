"""tasks.search.study keeps Optuna quiet only where studies are made and run, never by being imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import optuna
import pytest

from tasks.search.study import HEARTBEAT_WARNING, quiet_optuna

# Imports the study module's own imports first, so only what the module itself does is measured.
PROBE = textwrap.dedent(
    """
    import json, warnings
    import optuna, optuna.trial
    import tasks.config, tasks.errors, tasks.workspace
    filters, verbosity = list(warnings.filters), optuna.logging.get_verbosity()
    import tasks.search.study
    print(json.dumps({"filters_unchanged": warnings.filters == filters,
                      "verbosity": [verbosity, optuna.logging.get_verbosity()]}))
    """
)


def test_importing_the_study_module_changes_neither_optuna_verbosity_nor_warning_filters():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["filters_unchanged"], "importing tasks.search.study changed warnings.filters"
    before, after = probe["verbosity"]
    assert after == before, f"importing tasks.search.study set Optuna's verbosity from {before} to {after}"


def test_quiet_optuna_is_scoped_and_restores_what_it_changed():
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    filters = list(warnings.filters)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with quiet_optuna():
                assert optuna.logging.get_verbosity() == optuna.logging.WARNING
                warnings.warn(HEARTBEAT_WARNING + ".", UserWarning, stacklevel=1)
                warnings.warn("trial parameters are experimental", optuna.exceptions.ExperimentalWarning,
                              stacklevel=1)
            warnings.warn("still shown outside", UserWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == ["still shown outside"]
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        assert warnings.filters == filters
    finally:
        optuna.logging.set_verbosity(old)


def test_quiet_optuna_restores_the_verbosity_when_the_block_raises():
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        try:
            with quiet_optuna():
                raise RuntimeError("trial failed")
        except RuntimeError:
            pass
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(old)


def test_ctrl_c_during_a_trial_waits_for_the_next_safe_point():
    """The first SIGINT is held until interruption_point (an epoch boundary), a second one stops at once,
    and the previous handler is back after the block."""
    import os
    import signal

    from tasks.search.study import deferred_interrupt, interruption_point

    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            interruption_point()  # nothing pending: no-op
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the signal")  # not interrupted mid-write
            interruption_point()
            reached.append("past the safe point")
    assert reached == ["after the signal"] and signal.getsignal(signal.SIGINT) is before

    with pytest.raises(KeyboardInterrupt):  # a trial that ends before its next safe point: raised on the way out
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():  # twice: at once
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("not reached")
    assert reached == ["after the signal"]
    interruption_point()  # nothing left pending after the blocks
