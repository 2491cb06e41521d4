"""Reconstruction after the cut (compression_ops/reconstruct.py): the kept channels are read right, a
re-fit layer's output error is smaller than without the re-fit, and a trained net cut to 5x fewer MACs
keeps far more of its accuracy before any fine-tuning."""

from __future__ import annotations

import pytest
import torch
from digits16 import accuracy, digits_split

from compression_ops import ChannelPrune, OpData, apply
from compression_ops.reconstruct import kept_channels
from tasks.models import create_model

X = torch.randn(1, 1, 16, 16)


def test_kept_channels_name_the_original_weights_each_pruned_layer_holds():
    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10, width=16).eval()
    res = apply(m, ChannelPrune(ratio=0.5, reconstruct=False), OpData(example=X))
    history = res.report["pruning_history"]
    kept = kept_channels(m, history, X)
    before, after = dict(m.named_modules()), dict(res.model.named_modules())
    checked = 0
    for name, (keep_out, keep_in) in kept.items():
        w = before[name].weight.index_select(0, keep_out).index_select(1, keep_in)
        assert torch.equal(w, after[name].weight), name
        checked += int(keep_out.numel() < before[name].weight.shape[0] or keep_in.numel() < before[name].weight.shape[1])
    assert checked >= 5  # most layers lost input or output channels


def test_a_refit_layer_matches_the_unpruned_outputs_better():
    torch.manual_seed(0)
    x, y, _, _ = digits_split()
    m = create_model("resnet8", in_channels=1, num_classes=10, width=16)
    data = OpData(example=x[:1], batches=[(x[i:i + 128], y[i:i + 128]) for i in range(0, 1024, 128)])
    plain = apply(m, ChannelPrune(target_macs_reduction=3.0, reconstruct=False), data).model.eval()
    res = apply(m, ChannelPrune(target_macs_reduction=3.0, reconstruct=True), data)
    rec = res.report["reconstruction"]
    assert rec["layers_refit"] >= 3
    for name, row in rec["layers"].items():
        assert row["error_after"] <= row["error_before"], name
    assert any(row["error_after"] < 0.8 * row["error_before"] for row in rec["layers"].values())
    held_out = x[1024:1400]
    with torch.no_grad():
        ref = m.eval()(held_out)
        err_plain = float((plain(held_out) - ref).norm() / ref.norm())
        err_rec = float((res.model.eval()(held_out) - ref).norm() / ref.norm())
    assert err_rec < 0.8 * err_plain, (err_rec, err_plain)


@pytest.mark.slow
def test_a_trained_net_cut_to_5x_keeps_its_accuracy_before_fine_tuning():
    from compression_ops.finetune import TrainSpec, fit

    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_split()
    m = create_model("resnet8", in_channels=1, num_classes=10, width=16)
    batches = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(xtr), 64)]
    fit(m, batches, TrainSpec(epochs=12, lr=0.1, schedule="onecycle"))
    base = accuracy(m, xte, yte)
    assert base > 90
    data = OpData(example=xtr[:1], batches=batches)
    plain = apply(m, ChannelPrune(target_macs_reduction=5.0, reconstruct=False), data)
    rec = apply(m, ChannelPrune(target_macs_reduction=5.0, reconstruct=True), data)
    assert rec.report["macs_reduction"] >= 5.0
    acc_plain, acc_rec = accuracy(plain.model, xte, yte), accuracy(rec.model, xte, yte)
    print(f"base {base:.1f}%, cut to 5x: plain {acc_plain:.1f}%, reconstructed {acc_rec:.1f}%")
    assert acc_rec >= 0.5 * base
    assert acc_rec > acc_plain + 10
