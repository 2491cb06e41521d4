"""fit() trains in channels_last only where torch's CPU conv backward is safe: a strided 1x1 conv with
few input channels corrupts the heap on an odd-sized batch (a crash of the whole worker, not an error)."""

import subprocess
import sys
import textwrap

from torch import nn

from compression_ops.finetune import channels_last_safe


def _shortcut_net(in_ch: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, in_ch, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(in_ch, 16, 1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_rule_refuses_the_shapes_that_crash():
    assert channels_last_safe(_shortcut_net(16), _shortcut_net(32))
    assert not channels_last_safe(_shortcut_net(12))  # strided 1x1 with 12 input channels
    assert not channels_last_safe(_shortcut_net(16), _shortcut_net(8))  # any model of the pair
    few_out = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    assert not channels_last_safe(few_out)
    unstrided = nn.Sequential(nn.Conv2d(1, 12, 3), nn.Conv2d(12, 16, 1))  # 1x1, stride 1: safe
    assert channels_last_safe(unstrided)


def test_fit_survives_a_pruned_shortcut_on_odd_batches():
    """In a subprocess: before the rule covered strided 1x1 convs, this crashed the interpreter (SIGABRT or
    SIGSEGV) in the first epoch; the model's layout afterwards is the default one."""
    code = textwrap.dedent("""
        import torch
        from compression_ops import TrainSpec, fit
        from tests.compression_ops.test_channels_last import _shortcut_net
        torch.manual_seed(0)
        x, y = torch.randn(59 * 4, 1, 14, 14), torch.randint(0, 10, (59 * 4,))
        batches = [(x[i:i + 59], y[i:i + 59]) for i in range(0, len(y), 59)]
        model = _shortcut_net(12)
        hist = fit(model, batches, TrainSpec(epochs=3, lr=0.05))
        assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in hist)
        print("trained", len(hist), hist[-1]["train_loss"])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"fit crashed (rc {p.returncode}): {p.stderr[-2000:]}"
    assert p.stdout.startswith("trained 3")
