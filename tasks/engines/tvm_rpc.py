"""Run a TVM library on another device over TVM RPC: connect (bounded, with retries), upload, run, time.

The library is one that `tvm_build.build_tvm` cross-compiled for the device (model.so + meta.json).
`RemoteTVMRunner` checks it exactly as `load_tvm` does (meta.json complete, model.so's sha256) and
that it was built for the device's architecture, before anything is sent. Then the device loads it
into a Relax VM; `.run(x)` sends a batch and fetches the logits, `.time(x)` times it with TVM's
remote time_evaluator, so the clock runs on the device and the network is not part of the figure.

The emulated ARM device (infra/arm/rpc_device.sh: qemu-user running an aarch64 Python with the
aarch64 TVM wheel) is driven exactly like a board. Times measured on it are qemu's, which says
nothing about an ARM CPU's speed: `.time()` reports `emulated: True` for it (detected on this machine:
a loopback server run by a qemu-user process; or given by the caller).

No call here waits forever to connect: the TCP connect and the RPC handshake are bounded by the
device's `timeout_s`, failed tries are retried with exponential backoff, and the last failure is a
DeviceError naming the address, the tries and the fix. Once connected, a call on a device that hangs
without closing the connection is bounded only by `session_timeout_s` (the server ends the session).
"""

from __future__ import annotations

import gc
import hashlib
import ipaddress
import logging
import os
import platform
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.devices import Device, RPCConfig
from tasks.engines import tvm_build
from tasks.engines.base import check_input
from tasks.engines.timing import _summary
from tasks.engines.tvm_build import _ARCH_ALIASES, LIBRARY, REBUILD
from tasks.errors import ArtifactError, DeviceError

log = logging.getLogger(__name__)

FIX = "start the emulated device with `make arm-device`, or check rpc: in infra/devices.yaml"
EMULATED_NOTE = "emulated (qemu-user on this machine): not the speed of a real device"


class _TryFailed(Exception):
    """One connection attempt failed; connect() retries, then raises DeviceError."""


def _describe(rpc: RPCConfig) -> str:
    where = f"{rpc.host}:{rpc.port}"
    return f"TVM RPC tracker {where} (key {rpc.key!r})" if rpc.key else f"TVM RPC server {where}"


def _open(host: str, port: int, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError as e:
        raise _TryFailed(f"TCP connect timed out after {timeout:g}s") from e
    except OSError as e:
        raise _TryFailed(f"TCP connect failed: {e.strerror or e}") from e
    sock.settimeout(timeout)
    return sock


def _probe_server(host: str, port: int, timeout: float) -> None:
    """Check that an idle TVM RPC server listens: it reads a wrong magic number and hangs up.

    A server busy with another session (it serves one at a time) does not accept, so the kernel's
    backlog takes the connection and nothing answers: that, like a silent port, is a timeout here
    instead of a handshake that would wait for the other session to end.
    """
    sock = _open(host, port, timeout)
    with sock:
        try:
            sock.sendall(struct.pack("<i", 0))
            reply = sock.recv(4)
        except TimeoutError as e:
            raise _TryFailed(
                f"the port accepts connections but nothing answered within {timeout:g}s (the server "
                "is busy with another session, it serves one at a time, or it is not a TVM RPC server)"
            ) from e
        except OSError as e:
            if e.errno in (104, 32):  # ECONNRESET, EPIPE: it hung up, as an idle server does
                return
            raise _TryFailed(f"probe failed: {e.strerror or e}") from e
    if reply:
        raise _TryFailed(f"the program on port {port} is not a TVM RPC server (it answered {reply!r})")


def _bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """fn() in a helper thread, given up after timeout s (TVM's C++ handshake has no timeout).

    A call given up on keeps its thread until the socket gives; a session it opens late is dropped.
    """
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def target() -> None:
        try:
            value = fn()
        except Exception as e:  # tvm raises InternalError, RuntimeError, TVMError, ...
            box["error"] = e
            return
        with lock:
            if box.get("abandoned"):
                del value  # frees the RPC session: the server ends it
            else:
                box["value"] = value

    thread = threading.Thread(target=target, name="tvm-rpc-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:
        if thread.is_alive():
            box["abandoned"] = True
            raise _TryFailed(f"{what} did not complete within {timeout:g}s")
    if "error" in box:
        e = box["error"]
        first = (str(e).strip().splitlines() or [""])[-1][:300]
        raise _TryFailed(f"{what} failed ({type(e).__name__}: {first})") from e
    return box["value"]


def _connect_once(rpc: RPCConfig, timeout: float, session_timeout_s: float) -> Any:
    if rpc.key:
        _open(rpc.host, rpc.port, timeout).close()
        from tvm import rpc as tvm_rpc

        return _bounded(
            lambda: tvm_rpc.connect_tracker(rpc.host, rpc.port).request(
                rpc.key, session_timeout=session_timeout_s, max_retry=1
            ),
            timeout,
            f"requesting a device with key {rpc.key!r} from the tracker (all busy?)",
        )
    _probe_server(rpc.host, rpc.port, timeout)
    from tvm import rpc as tvm_rpc

    return _bounded(
        lambda: tvm_rpc.connect(rpc.host, rpc.port, session_timeout=session_timeout_s),
        timeout,
        "the RPC handshake",
    )


def connect(
    rpc: RPCConfig,
    *,
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float | None = None,
    session_timeout_s: float = 0,
) -> Any:
    """A tvm.rpc session with the device: directly, or through a tracker when rpc.key is set.

    Each try is bounded by timeout_s (default rpc.timeout_s) for the TCP connect and again for the
    handshake; a failed try is retried `retries` times, after backoff_s, 2*backoff_s, ... seconds.
    session_timeout_s > 0 makes the server end the session after that long (0: no limit).
    Raises DeviceError when every try failed.
    """
    if retries < 0 or backoff_s < 0:
        raise ValueError(f"need retries >= 0 and backoff_s >= 0, got {retries}, {backoff_s}")
    timeout = float(timeout_s if timeout_s is not None else rpc.timeout_s)
    tries = retries + 1
    what = _describe(rpc)
    last: Exception | None = None
    for i in range(tries):
        try:
            session = _connect_once(rpc, timeout, session_timeout_s)
            if i:
                log.info("%s: connected on try %d/%d", what, i + 1, tries)
            return session
        except _TryFailed as e:
            last = e
            if i + 1 < tries:
                delay = backoff_s * 2**i
                log.warning("%s: try %d/%d failed: %s; retrying in %.3gs", what, i + 1, tries, e, delay)
                time.sleep(delay)
    raise DeviceError(
        f"cannot reach the {what}: {tries} tries failed ({timeout:g}s timeout each; last: {last}); {FIX}"
    ) from last


def _arch(target: dict[str, Any] | None) -> str | None:
    triple = (target or {}).get("mtriple")
    if not triple:
        return None
    arch = str(triple).split("-")[0].lower()
    return _ARCH_ALIASES.get(arch, arch)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listener_pids(port: int) -> set[int]:
    """Pids of processes here with a TCP socket listening on port (empty when /proc cannot tell)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    pids: set[int] = set()
    if not inodes:
        return pids
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    pids.add(int(proc.name))
                    break
        except OSError:
            continue
    return pids


def detect_emulated(rpc: RPCConfig) -> bool | None:
    """True when the RPC server is a qemu-user process on this machine, False when it is another
    local program, None when it cannot tell (a remote host, or /proc does not show it)."""
    if rpc.key or not _is_loopback(rpc.host):
        return None
    pids = _listener_pids(rpc.port)
    if not pids:
        return None
    for pid in pids:
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            return None
        if os.path.basename(argv0).startswith("qemu-"):
            return True
    return False


class RemoteTVMRunner:
    """A library from build_tvm, loaded into a Relax VM on a device over TVM RPC.

    `.run(x)` takes float32 NCHW (any batch), returns the logits; `.time(x)` times on the device.
    """

    def __init__(
        self,
        out_dir: Path,
        session: Any,
        device_target: dict[str, Any] | None = None,
        *,
        name: str = "the RPC device",
        emulated: bool | None = None,
    ):
        import tvm
        from tvm import relax

        out_dir = Path(out_dir)
        lib_path = out_dir / LIBRARY
        meta = read_meta(out_dir)
        # No mtriple in the artifact's target: built for the machine that built it (load_tvm's rule).
        host = platform.machine().lower()
        built_for = _arch(meta.get("target")) or _ARCH_ALIASES.get(host, host)
        device_arch = _arch(device_target)
        if device_arch is not None and built_for != device_arch:
            raise ArtifactError(
                f"{lib_path} was built for {built_for} (target {meta.get('target')}), but {name} is "
                f"{device_arch} (target {device_target}); rebuild it for the device's target "
                "(targets: in pipelines.yaml)"
            )
        # The bytes that are sent are the bytes that were checked (the file could change in between).
        blob = bytearray(lib_path.read_bytes())
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ArtifactError(f"{lib_path} changed while it was being read; {REBUILD}")

        self.input_shape = tuple(meta["input_shape"])
        self.meta = meta
        self.name = name
        self.emulated = emulated
        self._warned = False
        self._tvm = tvm
        self._lib_path = lib_path
        self._session = session
        remote_name = f"shrinkflow-{meta['sha256'][:16]}.so"
        try:
            session.upload(blob, remote_name)
            rlib = session.load_module(remote_name)
            self._dev = session.cpu()
            self._vm = relax.VirtualMachine(rlib, self._dev)
        except Exception as e:  # tvm raises its own error types (RPC errors, load failures)
            raise DeviceError(
                f"{name} cannot load {lib_path} ({type(e).__name__}: {str(e).strip()[-500:]}); "
                "check that the library was built for this device's target and TVM version "
                f"(built with tvm {meta.get('tvm_version')})"
            ) from e

    @classmethod
    def for_device(
        cls, out_dir: Path, device: Device, *, retries: int = 3, backoff_s: float = 1.0, **connect_kw: Any
    ) -> RemoteTVMRunner:
        """Connect to device.rpc (see connect) and load out_dir's library there."""
        if device.rpc is None:
            raise DeviceError(
                f"device {device.name!r} has no rpc: in infra/devices.yaml; it runs in-process (load_tvm)"
            )
        # Check the artifact before connecting: a bad artifact is not worth waiting for a device.
        read_meta(out_dir)
        session = connect(device.rpc, retries=retries, backoff_s=backoff_s, **connect_kw)
        return cls(
            out_dir,
            session,
            device.tvm_target(),
            name=f"device {device.name!r} ({device.rpc.host}:{device.rpc.port})",
            emulated=detect_emulated(device.rpc),
        )

    def close(self) -> None:
        """End the RPC session (the server serves one at a time); the runner is unusable after."""
        # The device handle and the VM's remote module hold the session too: drop them all. The VM's
        # objects form reference cycles, so without a collection the socket stayed open until the
        # process exited (seen in the demo: the next model's connect waited 4 x 60 s, then failed).
        self._vm = self._dev = self._session = None
        gc.collect()

    def __enter__(self) -> RemoteTVMRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set_input(self, x: np.ndarray) -> None:
        if self._vm is None:
            raise DeviceError(f"the session with {self.name} is closed; create a new RemoteTVMRunner")
        x = check_input(x, self.input_shape, f"TVM library {self._lib_path} on {self.name}")
        # Copied to the device once; invoke_stateful then runs main on it there (no tuple crosses
        # the RPC boundary: outputs are fetched one tensor at a time with get_outputs).
        try:
            self._vm.set_input("main", self._tvm.runtime.tensor(x, device=self._dev))
        except Exception as e:  # RPC errors come as tvm's own error types
            raise self._lost("sending the input", e) from e

    def _lost(self, doing: str, e: Exception) -> DeviceError:
        return DeviceError(
            f"{self.name} failed while {doing} ({type(e).__name__}: {str(e).strip()[-500:]}); the device "
            "may have stopped or the session expired: check it (for the emulated one: "
            "infra/arm/rpc_device.sh status, and its log) and create a new runner"
        )

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch x of shape input_shape (any batch size), computed on the device."""
        self._set_input(x)
        try:
            self._vm.invoke_stateful("main")
            out = self._vm.get_outputs("main")
            # Models return a tuple in Relax even for one output; the logits are its first element.
            first = out[0] if isinstance(out, tuple) else out
            return first.numpy()
        except Exception as e:  # RPC errors come as tvm's own error types
            raise self._lost("running the model", e) from e

    def time(
        self, x: np.ndarray, *, number: int = 10, repeat: int = 10, warmup: int = 3, min_repeat_ms: int = 0
    ) -> dict[str, Any]:
        """Latency of one call in ms, timed on the device by TVM's time_evaluator.

        Each of the `repeat` samples is the mean of `number` calls (after `warmup` calls and the
        evaluator's own warm-up call). median/p90/mean/min are over the samples. `emulated` says
        whether the figure comes from an emulator (True), real hardware (False) or is unknown (None).
        """
        if number < 1 or repeat < 1 or warmup < 0:
            raise ValueError(f"need number, repeat >= 1 and warmup >= 0, got {number}, {repeat}, {warmup}")
        self._set_input(x)
        try:
            for _ in range(warmup):
                self._vm.invoke_stateful("main")
            timer = self._vm.time_evaluator(
                "invoke_stateful", self._dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
            )
            seconds = list(timer("main").results)
        except Exception as e:  # RPC errors come as tvm's own error types
            raise self._lost("timing the model", e) from e
        stats: dict[str, Any] = _summary([round(s * 1e9) for s in seconds])
        stats.update(
            {
                "number": number,
                "repeat": repeat,
                "batch": int(np.shape(x)[0]),
                "device": self.name,
                "target": self.meta.get("target"),
                "timed_on": "device (TVM time_evaluator over RPC)",
                "emulated": self.emulated,
            }
        )
        if self.emulated:
            stats["note"] = EMULATED_NOTE
            if not self._warned:
                log.warning("%s: latency is %s", self.name, EMULATED_NOTE)
                self._warned = True
        return stats


# ------------------------------------------------------------------ engine adapter (tasks/engines/__init__.py)

build = tvm_build.build  # cross-compiled for the device's target like any TVM library
read_meta = tvm_build.read_meta
describe = tvm_build.describe


def load(artifact: Path, device: Device, *, threads: int) -> RemoteTVMRunner:
    """The library loaded on the device over RPC; close the runner (or use `with`) to free the device."""
    return RemoteTVMRunner.for_device(artifact, device)
