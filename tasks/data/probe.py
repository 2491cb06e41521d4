"""What a data source will provide, found without loading it: image shape, class count, where it lies.

`shrinkflow check` uses this to build the model and try it on the data's shape before any stage runs;
reading a whole data set (60k Fashion-MNIST images, an image folder) would take longer than the check.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

from tasks.config import DataConfig
from tasks.errors import DatasetError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class DataProbe:
    input_shape: list[int]
    num_classes: int
    origin: str


def _idx_dims(path: Path) -> tuple[int, ...]:
    """The dimensions in an idx file's header (reads a few bytes, not the images)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08:
                raise DatasetError(f"{path} is not an idx file of unsigned bytes; reinstall the data set")
            return struct.unpack(f">{head[3]}I", f.read(4 * head[3]))
    except (OSError, EOFError, struct.error) as e:
        raise DatasetError(f"{path} cannot be read ({e}); reinstall the data set") from e


def _image_classes(base: Path) -> list[str]:
    """Class sub-folders of `base` that hold at least one image; errors name what is missing."""
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(found) < 2:
        raise DatasetError(f"{base} needs at least two class sub-folders, found {found}")
    empty = [c for c in found if not any(f.suffix.lower() in IMAGE_EXTS for f in (base / c).iterdir())]
    if empty:
        raise DatasetError(
            f"class folder(s) {', '.join(empty)} under {base} hold no images ({', '.join(sorted(IMAGE_EXTS))}); "
            "add images or remove the folders"
        )
    return found


def probe_data(cfg: DataConfig) -> DataProbe:
    """The shape and class count `prepare_data` will produce for this config, and a DatasetError if the
    source is missing."""
    if cfg.source == "synthetic":
        size = cfg.image_size or 8
        return DataProbe([1, size, size], cfg.num_classes, "synthetic")
    if cfg.source == "digits":
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            raise DatasetError("data.source digits needs scikit-learn: pip install scikit-learn")
        return DataProbe([1, 8, 8], 10, "sklearn.datasets.load_digits")
    if cfg.source == "fashion_mnist":
        from tasks.data.sources import FASHION_CLASSES, FASHION_FILES, fashion_root

        root = fashion_root(cfg)
        dims = _idx_dims(root / FASHION_FILES["x_train"])
        if len(dims) != 3:
            raise DatasetError(f"{root / FASHION_FILES['x_train']} holds {len(dims)}-d data, not images")
        return DataProbe([1, dims[1], dims[2]], len(FASHION_CLASSES), str(root))
    if cfg.source == "image_folder":
        if not cfg.path:
            raise DatasetError("data.source image_folder needs data.path: a folder of class sub-folders")
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist; set data.path to a folder of class sub-folders")
        classes = _image_classes(root / "train" if (root / "train").is_dir() else root)
        size = cfg.image_size or 32
        return DataProbe([1 if cfg.grayscale else 3, size, size], len(classes), str(root))
    raise DatasetError(f"unknown data source {cfg.source!r}")
