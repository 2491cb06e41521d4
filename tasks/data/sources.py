"""Data sources, registered by the name pipelines.yaml uses."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks.config import DataConfig
from tasks.data.dataset import Dataset, stratified_split
from tasks.errors import DatasetError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# A source returns (x_train, y_train, x_test, y_test, classes, info); x as uint8 NCHW.
SourceFn = Callable[[DataConfig], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str], dict]]
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Decorator: make a data source available under `name` in pipelines.yaml."""

    def deco(fn: SourceFn) -> SourceFn:
        SOURCES[name] = fn
        return fn

    return deco


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (MNIST format), gzipped or plain."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path} cannot be read ({e}); reinstall the data set") from e
    if len(data) < 4:
        raise DatasetError(f"{path} is truncated; reinstall the data set")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path} holds {body.size} bytes, expected {int(np.prod(dims))}: file is truncated")
    return body.reshape(dims)


FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def fashion_root(cfg: DataConfig) -> Path:
    """The folder holding Fashion-MNIST's four idx files; a DatasetError naming the fix when one is missing."""
    root = Path(cfg.path) if cfg.path else FASHION_DIR
    missing = [n for n in FASHION_FILES.values() if not (root / n).exists()]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). "
            "Install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), "
            "or set data.path to a folder holding the four idx .gz files."
        )
    return root


@register_source("fashion_mnist")
def fashion_mnist(cfg: DataConfig):
    root = fashion_root(cfg)
    arr = {k: read_idx(root / n) for k, n in FASHION_FILES.items()}
    x_train, x_test = arr["x_train"][:, None], arr["x_test"][:, None]
    return x_train, arr["y_train"].astype(np.int64), x_test, arr["y_test"].astype(np.int64), FASHION_CLASSES, {
        "origin": str(root)
    }


@register_source("digits")
def digits(cfg: DataConfig):
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 grey levels to 0..255 bytes, so every source is uint8.
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    # digits has no official test split: carve a fixed, stratified one.
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, cfg.test_fraction, seed=1234)
    return x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)], {"origin": "sklearn.datasets.load_digits"}


@register_source("image_folder")
def image_folder(cfg: DataConfig):
    """root/train/<class>/*.png (+ root/test/<class>/...) or root/<class>/* with a carved test split."""
    from PIL import Image, UnidentifiedImageError

    if not cfg.path:
        raise DatasetError("data.source image_folder needs data.path: a folder of class sub-folders")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; set data.path to a folder of class sub-folders")
    size = cfg.image_size or 32
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

    def read_tree(base: Path, classes: list[str] | None):
        found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = classes or found
        if len(classes) < 2:
            raise DatasetError(f"{base} needs at least two class sub-folders, found {found}")
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for f in sorted((base / c).glob("*")):
                if f.suffix.lower() not in exts:
                    continue
                try:
                    with Image.open(f) as im:
                        im = im.convert("L" if cfg.grayscale else "RGB").resize((size, size))
                        a = np.asarray(im, dtype=np.uint8)
                except (UnidentifiedImageError, OSError) as e:
                    raise DatasetError(f"{f} is not a readable image ({e}); remove or replace it") from e
                xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
                ys.append(ci)
        if not xs:
            raise DatasetError(f"no images ({', '.join(sorted(exts))}) under {base}")
        return np.stack(xs), np.array(ys, dtype=np.int64), classes

    if (root / "train").is_dir():
        x_tr, y_tr, classes = read_tree(root / "train", None)
        if (root / "test").is_dir():
            x_te, y_te, _ = read_tree(root / "test", classes)
        else:
            x_tr, y_tr, x_te, y_te = stratified_split(x_tr, y_tr, cfg.test_fraction, seed=1234)
    else:
        x, y, classes = read_tree(root, None)
        x_tr, y_tr, x_te, y_te = stratified_split(x, y, cfg.test_fraction, seed=1234)
    return x_tr, y_tr, x_te, y_te, classes, {"origin": str(root), "image_size": size}


@register_source("synthetic")
def synthetic(cfg: DataConfig):
    """Learnable class-conditional blobs: for unit tests only, never for figures."""
    rng = np.random.default_rng(cfg.seed)
    size = cfg.image_size or 8
    k = cfg.num_classes
    protos = rng.uniform(0, 255, size=(k, 1, size, size))

    def make(n: int):
        y = rng.integers(0, k, size=n)
        x = protos[y] + rng.normal(0, 40, size=(n, 1, size, size))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_tr, y_tr = make(cfg.num_samples)
    x_te, y_te = make(max(50, cfg.num_samples // 5))
    return x_tr, y_tr, x_te, y_te, [f"class{i}" for i in range(k)], {"origin": "synthetic"}


def build_dataset(cfg: DataConfig) -> Dataset:
    """Load a source, carve validation from train (the test split stays untouched), subset if asked."""
    if cfg.source not in SOURCES:
        raise DatasetError(f"unknown data source {cfg.source!r}; known: {', '.join(sorted(SOURCES))}")
    x_tr, y_tr, x_te, y_te, classes, info = SOURCES[cfg.source](cfg)
    x_tr, y_tr, x_val, y_val = stratified_split(x_tr, y_tr, cfg.val_fraction, seed=cfg.seed)
    if cfg.train_subset is not None and cfg.train_subset < len(y_tr):
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.choice(len(y_tr), cfg.train_subset, replace=False))
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    return Dataset(x_tr, y_tr, x_val, y_val, x_te, y_te, classes, cfg.source, info)
