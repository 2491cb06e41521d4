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


class ArtifactError(ShrinkflowError):
    """A stage's input artifact is missing, corrupt or from another model."""


class StageError(ShrinkflowError):
    """A stage cannot run (unknown name, an earlier stage has not run)."""


class PipelineRunError(ShrinkflowError):
    """A task of a pipeline's DAG run failed."""


class DeviceError(ShrinkflowError):
    """A device (e.g. a TVM RPC server) cannot be reached or used."""


class TransientError(ShrinkflowError):
    """A service or device was unreachable; a retry may succeed."""


class ServiceError(TransientError):
    """A service a run needs (the Optuna study storage, the MLflow tracking server) does not answer."""
