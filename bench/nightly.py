"""Nightly incremental recompression of `fashion_resnet`, timed: what a night costs when nothing, the base
model, or the data changed.

    python bench/nightly.py                 # the pipeline as declared (the first run takes ~15-20 min)
    python bench/nightly.py --quick         # fewer epochs/trials, host only: the same four nights, faster

The training side is played by this script: it trains the base (train settings of `fashion_resnet`) and
registers it in the workspace's MLflow registry as `fashion-base`, alias `production`. The pipeline is
`fashion_resnet` from pipelines.yaml with `model.weights: models:/fashion-base@production` and its data read
from a private copy of the Fashion-MNIST files (so the data can change). Each night is a real
`shrinkflow run` (Airflow, dag.test) in a fresh process with a new run id, as a scheduled run would be:

  1 first       nothing cached: every stage runs
  2 unchanged   same data, base and config: every stage should be reused
  3 new base    the training team registers version 2 (one more epoch) and moves `production`
  4 new data    1 % of the training images are withdrawn (a new data version)

Prints wall time and the stages that ran / were reused per night; writes bench/results/nightly.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tasks.stage_specs import STAGES  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FASHION = Path("/usr/share/datasets/fashion-mnist")
BASE_NAME = "fashion-base"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pipelines_file(work: Path, data_dir: Path, quick: bool) -> Path:
    """fashion_resnet from pipelines.yaml, with its base from the registry and its data from `data_dir`."""
    spec = yaml.safe_load((ROOT / "pipelines.yaml").read_text())["pipelines"]["fashion_resnet"]
    spec["data"]["path"] = str(data_dir)
    spec["model"]["weights"] = f"models:/{BASE_NAME}@production"
    spec["schedule"] = None
    if quick:
        spec["search"].update(n_trials=2, trial_epochs=1)
        spec["finetune"]["epochs"] = 2
        spec["targets"] = ["host"]
        spec["compile"]["tuning"]["budget_s"] = 10
        spec["benchmark"].update(warmup=5, repeat=30)
    path = work / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"fashion_resnet": spec}}, sort_keys=False))
    return path


def train_and_register(work: Path, data_dir: Path, epochs: int, start_from: Path | None, tag: str) -> Path:
    """The training team's job, in a subprocess: train (or continue) the base, register it, move the alias."""
    out = work / f"base-{tag}.pt"
    code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch, yaml
from compression_ops import TrainSpec, evaluate, fit
from tasks.config import DataConfig
from tasks.data import build_dataset
from tasks.data.loaders import Splits
from tasks.models import create_model
from tasks.models import register_base_model
spec = yaml.safe_load(open({str(ROOT / 'pipelines.yaml')!r}))['pipelines']['fashion_resnet']
sp = Splits(build_dataset(DataConfig(source='fashion_mnist', path={str(data_dir)!r})))
model = create_model('resnet8', in_channels=1, num_classes=10, **spec['model']['kwargs'])
start = {str(start_from) if start_from else None!r}
tr = spec['train']
if start:
    model.load_state_dict(torch.load(start, weights_only=True))
    ts = TrainSpec(epochs={epochs}, lr=tr['lr'] / 20, weight_decay=tr['weight_decay'], schedule='cosine', seed=1)
else:
    ts = TrainSpec(epochs={epochs}, lr=tr['lr'], weight_decay=tr['weight_decay'],
                   label_smoothing=tr['label_smoothing'], schedule='onecycle', seed=tr['seed'] if 'seed' in tr else 0)
fit(model, sp.batches('train', tr['batch_size'], train=True, augment=tr['augment'], seed=0), ts)
acc = evaluate(model, sp.batches('test'))['accuracy']
torch.save(model.state_dict(), {str(out)!r})
v = register_base_model(model, {BASE_NAME!r}, alias='production', workspace={str(work / 'ws')!r},
                        arch={{'name': 'resnet8', 'kwargs': spec['model']['kwargs'], 'input_shape': [1, 28, 28],
                              'num_classes': 10}})
print(f'base {tag}: test accuracy {{acc:.2f}}%, registered version {{v}}')
"""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training side failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    say(f"{proc.stdout.strip().splitlines()[-1]} ({time.perf_counter() - t0:.0f} s)")
    return out


def withdraw_training_images(data_dir: Path, fraction: float) -> None:
    """A new data version: the last `fraction` of the training images and labels are withdrawn."""
    for name, header in (("train-images-idx3-ubyte.gz", 16), ("train-labels-idx1-ubyte.gz", 8)):
        path = data_dir / name
        raw = gzip.decompress(path.read_bytes())
        n = int.from_bytes(raw[4:8], "big")
        keep = n - int(n * fraction)
        item = (len(raw) - header) // n
        body = raw[header : header + keep * item]
        path.write_bytes(gzip.compress(raw[:4] + keep.to_bytes(4, "big") + raw[8:header] + body))


def night(work: Path, config: Path, label: str) -> dict[str, Any]:
    """One scheduled run: a fresh `shrinkflow run` process with a new run id; wall time and stage outcomes."""
    run_id = f"night-{label}"
    env = {**os.environ, "SHRINKFLOW_HOME": str(work / "ws")}
    cmd = [str(Path(sys.executable).with_name("shrinkflow")), "--config", str(config), "run", "fashion_resnet",
           "--run-id", run_id]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"{run_id}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"night {label} failed (log {work / f'{run_id}.log'}):\n{proc.stderr[-4000:]}")
    state = json.loads((work / "ws" / "runs" / "fashion_resnet" / run_id / "run.json").read_text())
    stages = state["stages"]
    ran = [s for s in STAGES if s in stages and not stages[s].get("reused")]
    reused = [s for s in STAGES if stages.get(s, {}).get("reused")]
    reg = stages.get("register", {})
    row = {"night": label, "wall_s": round(wall, 1), "ran": ran, "reused": reused,
           "register": {k: reg.get(k) for k in ("version", "alias", "reason")},
           "test_accuracy": stages.get("finetune", {}).get("test_accuracy")}
    say(f"night {label}: {wall:.1f} s; ran {', '.join(ran) or '-'}; reused {', '.join(reused) or '-'}; "
        f"register: {row['register']}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 trials of 1 epoch, 2 fine-tune epochs, host only")
    ap.add_argument("--base-epochs", type=int, help="epochs of the base (default: fashion_resnet's train.epochs)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shrinkflow-nightly-"))
    data_dir = work / "fashion-mnist"
    shutil.copytree(FASHION, data_dir)
    config = pipelines_file(work, data_dir, args.quick)
    epochs = args.base_epochs or yaml.safe_load(config.read_text())["pipelines"]["fashion_resnet"]["train"]["epochs"]
    say(f"workspace {work}; base {epochs} epochs; {'quick settings' if args.quick else 'fashion_resnet as declared'}")
    rows = []
    v1 = train_and_register(work, data_dir, epochs, None, "v1")
    rows.append(night(work, config, "1-first"))
    rows.append(night(work, config, "2-unchanged"))
    train_and_register(work, data_dir, 1, v1, "v2")
    rows.append(night(work, config, "3-new-base"))
    withdraw_training_images(data_dir, 0.01)
    rows.append(night(work, config, "4-new-data"))

    print(f"\n{'night':14s} {'wall s':>8s}  ran / reused")
    for r in rows:
        print(f"{r['night']:14s} {r['wall_s']:8.1f}  ran: {', '.join(r['ran']) or '-'}\n{'':24s}reused: "
              f"{', '.join(r['reused']) or '-'}\n{'':24s}register: {r['register']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("nightly_quick.json" if args.quick else "nightly.json")
    out.write_text(json.dumps({"quick": args.quick, "base_epochs": epochs, "nights": rows}, indent=2) + "\n")
    say(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
