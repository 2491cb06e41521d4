"""The FPGA flow as a registered engine (tasks/engines/__init__.py): build, load, metadata, estimate."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.engines.base import BuildJob
from tasks.engines.fpga.build import build_hls
from tasks.engines.fpga.estimate import estimate_line, estimate_resources
from tasks.engines.fpga.runner import HLSRunner, _read_meta, load_hls
from tasks.errors import StageError

if TYPE_CHECKING:
    from tasks.devices import Device

__all__ = ["build", "describe", "estimate", "estimate_line", "load", "read_meta"]


def build(job: BuildJob) -> dict[str, Any]:
    """The quantized model (the plan's post-training ops applied) as an hls4ml project with its C
    simulation compiled; no vendor tools."""
    if job.deployed is None:
        raise StageError("fpga_hls builds the quantized model: BuildJob.deployed is needed")
    return build_hls(job.deployed(), job.example, job.out, **job.device.hls_options())


def read_meta(artifact: Path) -> dict[str, Any]:
    return _read_meta(artifact)


def load(artifact: Path, device: Device, *, threads: int) -> HLSRunner:
    return load_hls(artifact)


def estimate(artifact: Path) -> dict[str, Any]:
    """The analytic resource and latency estimate (not synthesis)."""
    return estimate_resources(artifact)


def describe(meta: dict[str, Any]) -> str:
    return (f"hls4ml project ({meta.get('build_seconds', 0):.0f} s); estimated {estimate_line(estimate_resources(meta))}; "
            "synthesis needs AMD Vitis HLS / Vivado (not run)")
