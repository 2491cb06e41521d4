import io

import numpy as np
import pytest
import torch

from compression_ops import apply
from compression_ops.kmeans_quant import KMeansQuant
from compression_ops.packing import (
    PackError,
    pack_bits,
    pack_model,
    pack_state_dict,
    packed_size,
    packing_report,
    unpack_bits,
    unpack_model,
    unpack_state_dict,
)
from compression_ops.sparsity import Sparsify
from tasks.models import create_model


def _trained_like(width: int = 8, seed: int = 0) -> torch.nn.Module:
    """A zoo model whose BatchNorm tensors are not their (very compressible) initial constants."""
    torch.manual_seed(seed)
    m = create_model("resnet8", in_channels=1, num_classes=10, width=width)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            for t in (mod.weight, mod.bias, mod.running_mean, mod.running_var):
                t.data = torch.rand_like(t) + 0.1
            mod.num_batches_tracked.fill_(123)
    m.fc.bias.data = torch.randn(10)
    return m.eval()


def _conv_linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


MODELS = {
    "dense": lambda m: m,
    "sparse50": lambda m: apply(m, Sparsify(sparsity=0.5)).model,
    "2:4": lambda m: apply(m, Sparsify(pattern="2:4")).model,
    "kmeans4": lambda m: apply(m, KMeansQuant(bits=4)).model,
    "sparse50_kmeans4": lambda m: apply(apply(m, Sparsify(sparsity=0.5)).model, KMeansQuant(bits=4)).model,
}


@pytest.fixture(scope="module")
def variants() -> dict[str, torch.nn.Module]:
    base = _trained_like()
    return {name: make(base) for name, make in MODELS.items()}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_is_exact(variants, name, compress):
    m = variants[name]
    blob = pack_model(m, compress=compress)
    _assert_identical(m.state_dict(), unpack_state_dict(blob))
    skeleton = create_model("resnet8", in_channels=1, num_classes=10, width=8).eval()
    restored = unpack_model(blob, skeleton)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(restored(x), m(x))
    assert packed_size(m, compress=compress) == len(blob)


def test_sizes_shrink_with_sparsity_and_clustering(variants):
    size = {n: packed_size(m) for n, m in variants.items()}
    assert size["sparse50"] < 0.6 * size["dense"]
    assert size["2:4"] < 0.6 * size["dense"]
    assert size["sparse50_kmeans4"] < size["kmeans4"] < size["sparse50"]
    # the conv/linear weights alone: 4 bits per weight and a 16-entry codebook per layer
    dense_w = len(pack_state_dict(_conv_linear_weights(variants["dense"])))
    km_w = len(pack_state_dict(_conv_linear_weights(variants["kmeans4"])))
    assert dense_w >= 6 * km_w
    rep = packing_report(variants["sparse50_kmeans4"])
    assert rep["packed_bytes"] == size["sparse50_kmeans4"]
    assert rep["packed_zlib_bytes"] == len(pack_model(variants["sparse50_kmeans4"], compress=True))
    assert rep["dense_bytes"] == packing_report(variants["dense"])["packed_bytes"]
    assert rep["tensors"]["layers.1.conv1.weight"]["encoding"] == "sparse_codebook"
    assert rep["tensors"]["layers.1.conv1.weight"]["bits"] == 4
    assert packing_report(variants["sparse50"])["tensors"]["fc.weight"]["encoding"] in ("sparse", "dense")


@pytest.mark.parametrize("bits", range(9))
def test_bit_packer_round_trips(bits):
    for n in (0, 1, 7, 8, 1001):
        v = np.random.default_rng(bits).integers(0, 2**bits, size=n).astype(np.uint8)
        packed = pack_bits(v, bits)
        assert len(packed) == (n * bits + 7) // 8
        assert np.array_equal(unpack_bits(packed, bits, n), v)


def test_encodings_and_dtypes():
    sd = {
        "ones": torch.ones(100),  # one value: a codebook of one entry and 0-bit indices
        "signed_zero": torch.tensor([-0.0, 0.0, 1.5, -2.0, float("inf"), float("nan")]),
        "half": torch.randn(33).half(),
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f64": torch.randn(4, dtype=torch.float64),
        "mask": torch.rand(50) > 0.5,
        "count": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "few": torch.tensor([3, 3, 3, 7, 7, 3], dtype=torch.int32),
        "sparse_i8": torch.tensor([0, 0, 0, 5, 0, 0, 0, 0, -1, 0, 0, 0], dtype=torch.int8),
    }
    out = unpack_state_dict(pack_state_dict(sd))
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(out[k], v) or k == "signed_zero", k
    sz = out["signed_zero"]
    assert torch.equal(sz[:5], sd["signed_zero"][:5]) and sz[5].isnan() and not sz[0].signbit()
    rep = packing_report(sd)["tensors"]
    assert rep["ones"]["encoding"] == "codebook" and rep["ones"]["bytes"] == 4
    assert rep["few"]["encoding"] == "codebook" and rep["few"]["bits"] == 1


def test_bad_input_is_rejected_without_unpickling():
    blob = pack_model(_trained_like())
    with pytest.raises(PackError, match="bad magic"):
        unpack_state_dict(b"PK\x03\x04" + blob[4:])
    with pytest.raises(PackError, match="truncated"):
        unpack_state_dict(blob[:-10])
    with pytest.raises(PackError, match="trailing"):
        unpack_state_dict(blob + b"\0")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)  # a pickle is not a packed model
    with pytest.raises(PackError):
        unpack_state_dict(buf.getvalue())
    with pytest.raises(PackError, match="dtype"):
        pack_state_dict({"c": torch.ones(2, dtype=torch.complex64)})
