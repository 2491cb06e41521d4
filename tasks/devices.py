"""The device registry (infra/devices.yaml): where a model is compiled for and timed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.config import PipelineConfig, project_dir, read_validated_yaml
from tasks.errors import ConfigError

DEFAULT_DEVICES_FILE = "infra/devices.yaml"
# shrinkflow's own registry: the fallback for a project that has none.
REPO_DEVICES_FILE = Path(__file__).resolve().parent.parent / DEFAULT_DEVICES_FILE


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RPCConfig(_Strict):
    host: str
    port: int = Field(9190, gt=0, lt=65536)
    key: str | None = Field(None, description="TVM RPC tracker key; none: connect to the server directly")
    timeout_s: float = Field(60, gt=0)


class Device(_Strict):
    name: str = ""
    description: str = ""
    target: dict[str, Any] = Field(description="a TVM target as a dict, e.g. {kind: llvm, mcpu: native}")
    cross_compiler: str | None = Field(
        None, description="gcc that links the library, e.g. aarch64-linux-gnu-gcc"
    )
    threads: int = Field(1, gt=0, description="threads every engine gets when timed on this device")
    rpc: RPCConfig | None = Field(None, description="none: run in-process on this machine")

    @field_validator("target")
    @classmethod
    def _has_kind(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("kind"), str):
            raise ValueError("a target needs a 'kind', e.g. {kind: llvm, mcpu: native}")
        return v

    @property
    def is_fpga(self) -> bool:
        """True for an HLS target ({kind: hls, ...}): an hls4ml project and its C simulation, not TVM."""
        return self.target.get("kind") == "hls"

    def hls_options(self) -> dict[str, Any]:
        """build_hls keyword arguments from the target dict (backend, part, io_type, clock_period_ns...)."""
        return {k: v for k, v in self.target.items() if k != "kind"}

    @property
    def is_local(self) -> bool:
        """True when the device is this machine (no RPC)."""
        return self.rpc is None

    def tvm_target(self) -> dict[str, Any]:
        """The target dict for tvm.target.Target, with mcpu 'native' resolved to the host CPU."""
        from tasks.engines.tvm_build import resolve_target

        return resolve_target(self.target)


class DevicesFile(_Strict):
    devices: dict[str, Device]


def devices_path(path: str | os.PathLike | None = None, *, project: Path | None = None) -> Path:
    """The devices file: the argument, $SHRINKFLOW_DEVICES, the project's infra/devices.yaml, or shrinkflow's own.

    project: the folder of the pipelines file (default: that of $SHRINKFLOW_PIPELINES or ./pipelines.yaml).
    """
    if path or os.environ.get("SHRINKFLOW_DEVICES"):
        return Path(path or os.environ["SHRINKFLOW_DEVICES"])
    own = (project or project_dir()) / DEFAULT_DEVICES_FILE
    return own if own.is_file() else REPO_DEVICES_FILE


def registry_of(cfg: PipelineConfig) -> Path:
    """The device registry a pipeline's targets are looked up in (resolved from its project, not the cwd)."""
    return devices_path(project=project_dir(cfg))


def load_devices(path: str | os.PathLike | None = None) -> dict[str, Device]:
    """Read and validate every device in the registry."""
    devices = read_validated_yaml(
        devices_path(path), DevicesFile, "devices", "device registry", "SHRINKFLOW_DEVICES"
    ).devices  # type: ignore[attr-defined]
    for name, device in devices.items():
        device.name = name
    return devices


HOST = "host"


def get_device(name: str, path: str | os.PathLike | None = None) -> Device:
    """One device by name, with a clear error listing the known names. "host" is always known: this
    machine, as the registry declares it or else an LLVM target for its own CPU."""
    devices = load_devices(path)
    if name == HOST and name not in devices:
        return Device(name=HOST, description="this machine", target={"kind": "llvm", "mcpu": "native"})
    if name not in devices:
        known = ", ".join(sorted(devices)) or "(none)"
        raise ConfigError(
            f"unknown device {name!r}; {devices_path(path)} declares: {known}. "
            "Use one of these in targets: or add it to the registry."
        )
    return devices[name]
