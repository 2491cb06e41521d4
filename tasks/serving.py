"""A registered version as an MLflow Model: a pyfunc whose predict runs the engine deploy.json chose.

The package (what the register stage writes, and the model's one artifact, `package`):

    model.pt        the checkpoint (PyTorch eager, the last fallback)
    compiled/       model.onnx, model.int8.onnx, host/model.so (TVM) with their sha256 metas
    deploy.json     the fastest engine per target and batch size, as the benchmark measured it
    metrics.json    the fine-tune stage's figures
    serving.json    input shape, classes, the data set's mean/std, threads

Input: float32 [N, C, H, W], normalised with the data set's mean and std, exactly as the benchmark
feeds the engines. With `params={"pixels": True}` the input is raw pixel values (0-255) and the model
normalises them itself. Output: logits [N, classes].

Engines: per call, the engine deploy.json chose for the host at the largest benchmarked batch size
not above N. An engine that cannot load here (missing file, a TVM library built for another CPU, an
ONNX Runtime without int8 kernels) is replaced by the next of the package's other engines, ONNX
Runtime fp32, TVM, PyTorch eager, with a warning that names both and the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from tasks.errors import ArtifactError

log = logging.getLogger(__name__)

PACKAGE = "package"  # the pyfunc artifact key
SERVING = "serving.json"
FALLBACK = ("onnxruntime", "tvm", "pytorch")
ENGINE_FILES = {"tvm": "compiled/{target}/model.so", "tvm_rpc": "compiled/{target}/model.so",
                "onnxruntime": "compiled/model.onnx",
                "onnxruntime_int8": "compiled/model.int8.onnx", "pytorch": "model.pt"}
# What a fresh environment needs to load the model; explicit, so MLflow infers nothing (no network).
REQUIREMENTS = ("shrinkflow", "mlflow", "torch", "numpy", "onnxruntime", "apache-tvm")
CHUNK = 1024  # rows per engine call: bounds memory for a large predict


def _load_engine(root: Path, engine: str, threads: int, target: str) -> Any:
    """A runner for one engine of the package; raises (ArtifactError and others) when it cannot load."""
    path = root / ENGINE_FILES[engine].format(target=target)
    if engine in ("onnxruntime", "onnxruntime_int8"):
        from tasks.engines.onnx_runtime import load_onnx

        return load_onnx(path, threads)
    if engine == "tvm":
        from tasks.engines.tvm_build import host_cpu, load_tvm, read_meta

        mcpu = read_meta(path.parent).get("target", {}).get("mcpu")
        if mcpu and mcpu != host_cpu():  # another CPU's instructions would crash this process, not raise
            raise ArtifactError(f"{path} was built for CPU {mcpu!r}, this machine is {host_cpu()!r}")
        return load_tvm(path.parent)
    if engine == "pytorch":
        from tasks.engines.pytorch_eager import TorchRunner
        from tasks.models.checkpoint import load_checkpoint

        return TorchRunner(load_checkpoint(path)[0])
    raise ArtifactError(f"unknown engine {engine!r} in {root / 'deploy.json'}")


def read_info(root: Path) -> dict[str, Any]:
    """serving.json, or (a package registered before it existed) what the checkpoint says."""
    if (root / SERVING).is_file():
        return json.loads((root / SERVING).read_text())
    from tasks.models.checkpoint import load_checkpoint

    _, payload = load_checkpoint(root / "model.pt")
    return {"input_shape": list(payload["input_shape"]), "num_classes": payload["num_classes"],
            "mean": None, "std": None, "threads": 1}


class Package:
    """A package folder loaded for inference: `.run(x)` picks the deployed engine for x's batch size."""

    def __init__(self, root: Path, *, threads: int | None = None, target: str = "host"):
        self.root, self.target = Path(root), target
        if not (self.root / "model.pt").is_file():
            raise ArtifactError(f"{self.root} is not a shrinkflow package (no model.pt); re-run the register stage")
        self.info = read_info(self.root)
        env = os.environ.get("SHRINKFLOW_SERVING_THREADS")
        self.threads = int(threads or env or self.info.get("threads") or 1)
        deploy = self.root / "deploy.json"
        chosen = json.loads(deploy.read_text()).get(target, {}) if deploy.is_file() else {}
        # (batch, engine) by batch size; no benchmark: PyTorch eager at every size.
        self.plan = sorted((int(b), v["engine"]) for b, v in chosen.items()) or [(1, "pytorch")]
        self.fallbacks: list[dict[str, str]] = []
        self._runners: dict[str, tuple[str, Any]] = {}
        for _, engine in self.plan:
            self._runners.setdefault(engine, self._load(engine))

    def _load(self, engine: str) -> tuple[str, Any]:
        """(engine that loaded, runner): the chosen one, else the first of the fallback chain that loads."""
        others = [e for _, e in self.plan if e != engine] + [e for e in FALLBACK if e != engine]
        errors = []
        for candidate in dict.fromkeys([engine, *others]):
            try:
                runner = _load_engine(self.root, candidate, self.threads, self.target)
            except Exception as e:  # engines raise ArtifactError, ImportError, TVM/ORT errors
                errors.append(f"{candidate}: {type(e).__name__}: {e}")
                continue
            if candidate != engine:
                msg = (f"shrinkflow model {self.root}: engine {engine} cannot load here ({errors[0]}); "
                       f"using {candidate} instead" + (" (float, not int8: outputs differ slightly)"
                                                       if engine.endswith("_int8") else ""))
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                log.warning(msg)
                self.fallbacks.append({"chosen": engine, "used": candidate, "why": errors[0]})
            return candidate, runner
        raise ArtifactError(f"no engine of {self.root} loads here: " + "; ".join(errors))

    def engine_for(self, batch: int) -> str:
        """The engine that runs a batch of this size (after any fallback)."""
        chosen = next((e for b, e in reversed(self.plan) if b <= batch), self.plan[0][1])
        return self._runners[chosen][0]

    def artifact_bytes(self, batch: int) -> int:
        """Bytes of the file the engine for this batch size loads."""
        return (self.root / ENGINE_FILES[self.engine_for(batch)].format(target=self.target)).stat().st_size

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Raw pixel values (0-255) to the model's input, with the data set's mean and std."""
        mean, std = self.info.get("mean"), self.info.get("std")
        if mean is None or std is None:
            raise ArtifactError(f"{self.root} records no mean/std (registered before serving.json): pass normalised input")
        x = np.asarray(pixels, dtype=np.float32) / 255.0
        shape = (1, -1, 1, 1)
        return ((x - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape)).astype(
            np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits [N, classes] for a float32 [N, C, H, W] batch (normalised)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        chosen = next((e for b, e in reversed(self.plan) if b <= len(x)), self.plan[0][1])
        runner = self._runners[chosen][1]
        if len(x) <= CHUNK:
            return runner.run(x)
        return np.concatenate([runner.run(x[i: i + CHUNK]) for i in range(0, len(x), CHUNK)])


def as_batch(model_input: Any, input_shape: list[int]) -> np.ndarray:
    """A numpy array, a DataFrame (one column of flattened images, or one column per value) or a list,
    as float32 [N, C, H, W]."""
    if hasattr(model_input, "to_numpy"):  # pandas, when called without MLflow's schema enforcement
        cols = list(model_input.columns)
        first = model_input[cols[0]].iloc[0] if len(model_input) else None
        if len(cols) == 1 and isinstance(first, list | np.ndarray):
            model_input = np.stack([np.asarray(v, np.float32).reshape(-1) for v in model_input[cols[0]]])
        else:
            model_input = model_input.to_numpy()
    x = np.asarray(model_input, dtype=np.float32)
    want = int(np.prod(input_shape))
    if x.ndim == 2 and x.shape[1] == want or x.ndim == len(input_shape) + 1:
        return np.ascontiguousarray(x.reshape(-1, *input_shape))
    raise ArtifactError(f"expected input [N, {', '.join(map(str, input_shape))}] (or [N, {want}] flattened), "
                        f"got shape {tuple(x.shape)}")


class ShrinkflowModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of a shrinkflow package: logits from the engine deploy.json chose for this host."""

    def load_context(self, context: Any) -> None:
        self.package = Package(Path(context.artifacts[PACKAGE]))

    # np.ndarray: what MLflow's schema enforcement hands over (a DataFrame is reshaped by the signature);
    # MLflow infers no schema from this hint, the logged signature is the schema.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        """Logits [N, classes] of the deployed engine; params {"pixels": true} for raw 0-255 input."""
        x = as_batch(model_input, self.package.info["input_shape"])
        if (params or {}).get("pixels"):
            x = self.package.normalise(x)
        return self.package.run(x)


def signature(info: dict[str, Any]) -> Any:
    """Tensor signature: float32 [-1, C, H, W] in, float32 [-1, classes] out, param `pixels` (bool)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, *info["input_shape"]))]),
        outputs=Schema([TensorSpec(f32, (-1, int(info["num_classes"])))]),
        params=ParamSchema([ParamSpec("pixels", "boolean", False)]),
    )


def requirements() -> list[str]:
    """Pinned requirements of what is installed here (explicit: MLflow then infers nothing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in REQUIREMENTS:
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{dist}=={version(dist)}")
    return out


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow's global tracking URI set to uri for the block, then put back (env var included).

    For MLflow calls that ignore a client's URI: fluent log_model, and the SQL registry resolving a
    models:/<model_id> source (a TODO in MLflow's sqlalchemy_store)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    # A stage's log is for its own lines, not a progress bar per artifact copy.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def log_package(pkg: Path, example: np.ndarray, *, tracking_uri: str, run_id: str,
                tags: dict[str, str] | None = None) -> Any:
    """Log the package as a pyfunc MLflow Model of run run_id; returns MLflow's ModelInfo."""
    import mlflow

    info = read_info(pkg)
    meta = {"shrinkflow_input": "float32 [N, C, H, W] normalised with mean/std; params pixels=true: raw 0-255",
            **{k: info.get(k) for k in ("input_shape", "num_classes", "classes", "mean", "std") if k in info}}
    with using_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        return mlflow.pyfunc.log_model(
            name="model", python_model=ShrinkflowModel(), artifacts={PACKAGE: str(pkg)},
            signature=signature(info), input_example=np.ascontiguousarray(example, dtype=np.float32),
            pip_requirements=requirements(), metadata=meta, tags=tags,
        )


def package_dir(model_dir: Path) -> Path:
    """The package inside a downloaded model version: a pyfunc's artifact, or an older plain folder."""
    model_dir = Path(model_dir)
    if (model_dir / "MLmodel").is_file():
        from mlflow.models import Model

        flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
        rel = flavor.get("artifacts", {}).get(PACKAGE, {}).get("path")
        if rel is None:
            raise ArtifactError(f"{model_dir} is an MLflow Model without a shrinkflow package")
        return model_dir / rel
    return model_dir


def package_sha256(root: Path) -> str:
    """sha256 over every file of a package (relative path and content), in path order."""
    import hashlib

    from tasks.engines.base import sha256_file

    h = hashlib.sha256()
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()
