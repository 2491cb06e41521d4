"""Accuracy right after the cut, before any fine-tuning: a run's trained base pruned to N x fewer MACs,
without and with the least-squares reconstruction (compression_ops/reconstruct.py), side by side.

    .venv/bin/python bench/cut.py --pipeline fashion_resnet [--run-id ID] [--ratios 2 3 5 9] [--importance l2]
                                  [--finetune-epochs N]   # then N epochs of KD fine-tuning of both, as the stage does

Uses the base and the data of an existing run (default: the pipeline's latest in the workspace), e.g.
after `make demo`. Calibration: 8 training batches of 64 images; accuracy: the whole test split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compression_ops import ChannelPrune, Distill, OpData, TrainSpec, apply, evaluate, fit  # noqa: E402
from tasks.config import load_pipeline  # noqa: E402
from tasks.context import StageContext  # noqa: E402
from tasks.workspace import list_runs, run_paths  # noqa: E402


def accuracy(model: torch.nn.Module, batches) -> float:
    return evaluate(model, batches)["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="fashion_resnet")
    ap.add_argument("--run-id")
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 3, 5, 9])
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--finetune-epochs", type=int, default=0)
    args = ap.parse_args()
    runs = [r for r in list_runs() if r.pipeline == args.pipeline and (r.stage_dir("train_base") / "model.pt").is_file()]
    if args.run_id:
        paths = run_paths(args.pipeline, args.run_id)
    elif runs:
        paths = runs[-1]
    else:
        raise SystemExit(f"no run of {args.pipeline!r} with a trained base in the workspace: run it first")
    ctx = StageContext(cfg=load_pipeline(args.pipeline), paths=paths, tracker=None)
    splits = ctx.splits()
    base, _ = ctx.model("train_base")
    test = splits.batches("test", 512)
    calib = list(splits.batches("train", 64, train=True, seed=1))[:8]
    data = OpData(example=splits.example(1), batches=calib)
    base_acc = accuracy(base, test)
    print(f"{args.pipeline} run {paths.run_id}: base {base_acc:.2f}% test accuracy; importance {args.importance}")
    tuned = args.finetune_epochs > 0
    head = f" {'plain, tuned %':>15s} {'recon., tuned %':>16s}" if tuned else ""
    print(f"{'MACs cut':>8s} {'plain %':>8s} {'reconstructed %':>16s} {'of base':>8s} {'re-fit s':>9s}{head}")
    for ratio in args.ratios:
        plain = apply(base, ChannelPrune(target_macs_reduction=ratio, importance=args.importance, reconstruct=False), data)
        t0 = time.perf_counter()
        rec = apply(base, ChannelPrune(target_macs_reduction=ratio, importance=args.importance, reconstruct=True), data)
        seconds = time.perf_counter() - t0
        a_plain, a_rec = accuracy(plain.model, test), accuracy(rec.model, test)
        line = (f"{rec.report['macs_reduction']:7.2f}x {a_plain:8.2f} {a_rec:16.2f} {100 * a_rec / base_acc:7.1f}% "
                f"{seconds:9.1f}")
        if tuned:  # the finetune stage's recipe: KD from the base, SGD, cosine, the pipeline's lr and batch size
            fc = ctx.cfg.finetune
            spec = TrainSpec(epochs=args.finetune_epochs, lr=fc.lr)
            train = splits.batches("train", fc.batch_size, train=True, augment=True, seed=0)
            for result in (plain, rec):
                fit(result.model, train, spec, teacher=base, distill=Distill())
            line += f" {accuracy(plain.model, test):15.2f} {accuracy(rec.model, test):16.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
