import pytest
import torch

from compression_ops import OpConfigError, TrainSpec, apply, config_from_dict, fit
from compression_ops.kmeans_quant import KMeansQuant, kmeans_1d
from compression_ops.metrics import weight_bits
from compression_ops.sparsity import Sparsify
from tasks.models import create_model


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet8", in_channels=1, num_classes=10, width=8)


def _batches(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}


@pytest.mark.parametrize("init", ["linear", "density", "random"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_at_most_2_to_the_bits_distinct_values(bits, init):
    m = _tiny()
    res = apply(m, KMeansQuant(bits=bits, init=init))
    for name, w in _weights(res.model).items():
        assert torch.unique(w).numel() <= 2**bits, name
        assert res.report["layers"][name]["distinct"] <= 2**bits
    assert all(getattr(mod, "weight_bits", None) == bits for mod in res.model.modules()
               if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear))
    assert weight_bits(res.model) == bits
    assert res.report["layers_clustered"] == len(_weights(m))
    # Lloyd-Max on a Gaussian leaves a relative error of 0.60, 0.34 and 0.10 at 1, 2 and 4 bits
    assert res.report["weight_rel_error"] < {1: 0.65, 2: 0.4, 4: 0.15}[bits]
    assert torch.unique(m.fc.weight).numel() > 2**bits  # the input model is untouched


def test_kmeans_1d_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-2.0, 0.5, 3.0])
    x = (centres[:, None] + 0.01 * torch.randn(3, 200, generator=g)).reshape(-1)
    for init in ("linear", "density"):  # random (Forgy) init can start two centroids in one cluster
        c, idx = kmeans_1d(x, 3, init)
        assert torch.allclose(c.float(), centres, atol=0.01), init
        assert torch.equal(idx, torch.arange(3).repeat_interleave(200))
    c, idx = kmeans_1d(torch.tensor([1.0, 2.0, 1.0]), 4)  # fewer distinct values than centroids: exact
    assert c.tolist() == [1.0, 2.0] and idx.tolist() == [0, 1, 0]


def test_codebook_finetuning_keeps_weights_tied():
    res = apply(_tiny(), KMeansQuant(bits=3))
    hook = res.hooks[0]
    start = {n: c.clone() for n, c in hook.centroids.items()}
    fit(res.model, _batches(4), TrainSpec(epochs=1, lr=0.05), hooks=res.hooks)
    moved = 0
    for name, w in _weights(res.model).items():
        layer = hook.layers[name]
        table = torch.cat([layer.centroids, layer.centroids.new_zeros(1)]).float()
        assert torch.equal(w.reshape(-1), table[layer.assign]), name  # every weight is its centroid
        assert torch.unique(w).numel() <= 8
        moved += not torch.allclose(layer.centroids, start[name])
    assert moved >= len(start) // 2  # fine-tuning moved the codebooks
    got = hook.finish()
    assert got["centroid_shift_mean"] > 0 and max(got["distinct_values"].values()) <= 8


def test_sparse_zeros_stay_zero_and_codebook_covers_the_rest():
    sparse = apply(_tiny(), Sparsify(sparsity=0.5))
    res = apply(sparse.model, KMeansQuant(bits=2))
    zeros = {n: w == 0 for n, w in _weights(sparse.model).items()}
    for name, w in _weights(res.model).items():
        assert torch.equal(w == 0, zeros[name]), name
        assert torch.unique(w[w != 0]).numel() <= 4
    fit(res.model, _batches(3), TrainSpec(epochs=1, lr=0.05), hooks=sparse.hooks + res.hooks)
    for name, w in _weights(res.model).items():
        assert torch.equal(w == 0, zeros[name]), name
        assert torch.unique(w[w != 0]).numel() <= 4


def test_per_layer_bits_and_skip():
    m = _tiny()
    res = apply(m, KMeansQuant(bits=4, per_layer_bits={"fc": 1}, skip=["stem"]))
    assert torch.unique(res.model.fc.weight).numel() <= 2 and res.model.fc.weight_bits == 1
    assert torch.equal(res.model.stem[0].weight, m.stem[0].weight)
    assert not hasattr(res.model.stem[0], "weight_bits")
    assert "stem.0" not in res.report["layers"] and res.report["layers"]["fc"]["bits"] == 1


def test_mild_clustering_keeps_outputs_close():
    m = _tiny().eval()
    p = apply(m, KMeansQuant(bits=6)).model.eval()
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        y, yp = m(x), p(x)
    assert float((y - yp).norm() / y.norm()) < 0.1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 0}, r"bits=0 is out of range"),
        ({"bits": 9}, r"bits=9 is out of range"),
        ({"bits": 2.5}, r"bits=2.5: expected a whole number"),
        ({"init": "kmeans++"}, r"init='kmeans\+\+'"),
        ({"iters": 0}, r"iters=0"),
        ({"per_layer_bits": {"fc": 0}}, r"per_layer_bits\['fc'\]=0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(OpConfigError, match=match):
        KMeansQuant(**kwargs)


def test_unknown_layer_names_and_json_roundtrip():
    with pytest.raises(OpConfigError, match=r"\['nope'\] not in the model"):
        apply(_tiny(), KMeansQuant(skip=["nope"]))
    with pytest.raises(OpConfigError, match=r"per_layer_bits names \['layers'\]"):
        apply(_tiny(), KMeansQuant(per_layer_bits={"layers": 2}))
    c = KMeansQuant(bits=5, init="density", per_layer_bits={"fc": 8}, skip=["stem.0"])
    assert config_from_dict(c.to_dict()) == c
