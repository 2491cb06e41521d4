"""infra/constraints.txt pins what pyproject.toml asks for: every dependency of the project and of its
extras has exactly one pin there, and the pin satisfies the range. A dependency added to pyproject.toml
without `make lock` fails here, not on a fresh machine's install.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "infra" / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)$")


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line.strip())
        assert match, f"infra/constraints.txt:{number}: {line!r} is not name==version"
        name = canonicalize_name(match[1])
        assert name not in pins, f"infra/constraints.txt:{number}: {name} is pinned twice"
        pins[name] = Version(match[2])
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        names += extra
    return [Requirement(r) for r in names]


@pytest.mark.parametrize("requirement", _requirements(), ids=str)
def test_every_dependency_is_pinned_within_its_range(requirement: Requirement) -> None:
    name = canonicalize_name(requirement.name)
    if name == "shrinkflow":  # the dev extra's shrinkflow[cluster]: the project itself
        return
    pins = _pins()
    assert name in pins, f"{requirement} has no pin in infra/constraints.txt: run `make lock`"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"infra/constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}: "
        "run `make lock`")


def test_torch_pin_is_the_cpu_wheel_on_disk() -> None:
    """A local label (+cpu) in the pin would refuse the same release from another index."""
    assert str(_pins()["torch"]) == "2.13.0"
