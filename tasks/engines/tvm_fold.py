"""Fold the model's constant weight arithmetic in numpy before TVM legalizes it.

After import, NHWC conversion and batch-norm decomposition, a Relax graph carries hundreds of small
operations on constants only: the weight transposes ConvertLayout adds (OIHW -> HWIO), the
transposes of Linear weights, the `expand_dims`, `add` and `sqrt` of each decomposed batch norm.
TVM's own FoldConstant evaluates each of them by compiling it with LLVM and running it, one build per
distinct shape: on the MobileNetV2 family (52 convs) that was 34-54 s of a 45-66 s compile, for work
numpy does in milliseconds. This pass evaluates those calls in numpy first; FoldConstant then finds
(nearly) nothing left. A call is folded only when every argument is a constant and the numpy result
has exactly the shape and dtype Relax inferred for it; anything else is left for FoldConstant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _ints(values: Any) -> list[int] | None:
    return None if values is None else [int(v) for v in values]


def _permute(call: Any, x: np.ndarray) -> np.ndarray:
    axes = _ints(call.attrs.axes)
    return np.transpose(x, axes)


def _expand_dims(call: Any, x: np.ndarray) -> np.ndarray:
    axes = sorted(a % (x.ndim + len(call.attrs.axis)) for a in _ints(call.attrs.axis) or [])
    for a in axes:
        x = np.expand_dims(x, a)
    return x


def _squeeze(call: Any, x: np.ndarray) -> np.ndarray:
    axes = _ints(call.attrs.axis)
    return np.squeeze(x, axis=None if axes is None else tuple(axes))


def _reshape(call: Any, x: np.ndarray, *_: Any) -> np.ndarray:
    return x.reshape([int(d) for d in call.ty.shape])


# op name -> (function of the call and the numpy arguments, number of tensor arguments)
_NUMPY: dict[str, tuple[Callable[..., np.ndarray], int]] = {
    "relax.permute_dims": (_permute, 1),
    "relax.expand_dims": (_expand_dims, 1),
    "relax.squeeze": (_squeeze, 1),
    "relax.reshape": (_reshape, 1),
    "relax.add": (lambda _c, a, b: a + b, 2),
    "relax.subtract": (lambda _c, a, b: a - b, 2),
    "relax.multiply": (lambda _c, a, b: a * b, 2),
    "relax.divide": (lambda _c, a, b: a / b, 2),
    "relax.sqrt": (lambda _c, a: np.sqrt(a), 1),
    "relax.rsqrt": (lambda _c, a: 1.0 / np.sqrt(a), 1),
    "relax.negative": (lambda _c, a: -a, 1),
    "relax.astype": (lambda c, a: a.astype(str(c.attrs.dtype)), 1),
}


def fold_constants_pass() -> Any:
    """A Relax module pass that folds constant-only calls of the ops above in numpy."""
    import tvm
    from tvm import relax
    from tvm.ir.expr import GenericConst

    @relax.expr_functor.mutator
    class _Folder(relax.PyExprMutator):
        def _constant(self, arg: Any) -> np.ndarray | None:
            if isinstance(arg, relax.Var):
                arg = self.lookup_binding(arg)
            value = arg.value if isinstance(arg, GenericConst) else None
            return value.numpy() if hasattr(value, "numpy") else None

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            rule = _NUMPY.get(call.op.name) if isinstance(call.op, tvm.ir.Op) else None
            sinfo = call.ty
            if rule is None or not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
                return call
            fn, n = rule
            values = [self._constant(a) for a in call.args[:n]]
            if any(v is None for v in values):
                return call
            try:
                shape = [int(d) for d in sinfo.shape]
                out = np.asarray(fn(call, *values))
            except Exception:  # a symbolic shape or an attribute numpy does not take: TVM folds it
                return call
            if list(out.shape) != shape or str(out.dtype) != str(sinfo.dtype):
                return call
            return relax.const(np.ascontiguousarray(out), str(sinfo.dtype))

    @tvm.transform.module_pass(opt_level=0, name="ShrinkflowNumpyFoldConstant")
    def _pass(mod: Any, _ctx: Any) -> Any:
        folder = _Folder(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                folder.builder_.update_func(gv, folder.visit_expr(func))
        return folder.builder_.get()

    return _pass
