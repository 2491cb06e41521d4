"""Models by name: `create_model("resnet8", in_channels=1, num_classes=10, width=16)`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tasks.errors import ModelLoadError

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: a factory(in_channels, num_classes, **kwargs) -> nn.Module, named for pipelines.yaml."""

    def deco(fn: ModelFactory) -> ModelFactory:
        MODELS[name] = fn
        return fn

    return deco


def create_model(name: str, *, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    _load_builtin()
    if name not in MODELS:
        raise ModelLoadError(
            f"unknown model {name!r}; the zoo has: {', '.join(sorted(MODELS))}. "
            "For your own model use model.factory: 'package.module:function'."
        )
    try:
        return MODELS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ModelLoadError(f"model {name!r} does not take these arguments: {e}") from e


def _load_builtin() -> None:
    # Importing registers the zoo; kept lazy so `tasks.models` stays cheap.
    from tasks.models import mobilenet, resnet  # noqa: F401
