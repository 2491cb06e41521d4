import gzip
import struct

import numpy as np
import pytest

from tasks.config import DataConfig
from tasks.data import build_dataset, load_dataset_file, save_dataset
from tasks.data.loaders import Splits
from tasks.data.sources import FASHION_DIR, read_idx
from tasks.errors import ArtifactError, DatasetError


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_roundtrip_and_truncation(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", a)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), a)
    with gzip.open(tmp_path / "t.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "t.gz")


def test_fashion_from_a_folder_of_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (200, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.repeat(np.arange(10), 20))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (50, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(50) % 10)
    ds = build_dataset(DataConfig(source="fashion_mnist", path=str(tmp_path), val_fraction=0.1))
    assert ds.x_train.shape == (180, 1, 28, 28) and ds.x_val.shape == (20, 1, 28, 28)
    assert ds.x_test.shape == (50, 1, 28, 28)  # the test split is untouched
    assert ds.num_classes == 10


def test_missing_fashion_names_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        build_dataset(DataConfig(source="fashion_mnist", path=str(tmp_path)))


@pytest.mark.skipif(not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_split_sizes():
    ds = build_dataset(DataConfig(source="fashion_mnist", val_fraction=0.1))
    assert ds.summary()["sizes"] == {"train": 54000, "val": 6000, "test": 10000}
    assert ds.input_shape == (1, 28, 28)
    # the validation split is stratified: 600 images of every class
    assert np.bincount(ds.y_val).tolist() == [600] * 10


def test_digits_split_is_disjoint_and_deterministic():
    a = build_dataset(DataConfig(source="digits"))
    b = build_dataset(DataConfig(source="digits"))
    assert a.content_hash() == b.content_hash()
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    assert a.x_train.dtype == np.uint8 and a.x_train.max() > 200
    c = build_dataset(DataConfig(source="digits", seed=1))
    assert c.content_hash() != a.content_hash()  # another validation carve is another version


def test_image_folder(tmp_path):
    from PIL import Image

    for cls, val in (("cat", 30), ("dog", 220)):
        for split, n in (("train", 6), ("test", 2)):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((20, 20), val + i, np.uint8)).save(d / f"{i}.png")
    ds = build_dataset(DataConfig(source="image_folder", path=str(tmp_path), image_size=16, val_fraction=0.2))
    assert ds.classes == ["cat", "dog"] and ds.input_shape == (1, 16, 16)
    assert len(ds.y_test) == 4 and len(ds.y_train) + len(ds.y_val) == 12
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="broken.png"):
        build_dataset(DataConfig(source="image_folder", path=str(tmp_path)))


def test_save_is_content_addressed_and_checked(tmp_path):
    ds = build_dataset(DataConfig(source="synthetic", num_samples=100))
    h1 = save_dataset(ds, tmp_path / "store", tmp_path / "run1" / "d.npz")
    h2 = save_dataset(ds, tmp_path / "store", tmp_path / "run2" / "d.npz")
    assert h1 == h2 and len(list((tmp_path / "store").glob("*.npz"))) == 1
    back = load_dataset_file(tmp_path / "run1" / "d.npz", expect_hash=h1)
    assert np.array_equal(back.x_test, ds.x_test)
    with pytest.raises(ArtifactError, match="does not match its recorded hash"):
        load_dataset_file(tmp_path / "run1" / "d.npz", expect_hash="0" * 64)


def test_splits_normalise_and_batch():
    ds = build_dataset(DataConfig(source="synthetic", num_samples=300))
    sp = Splits(ds)
    x, _ = sp.tensors["train"]
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    tb = sp.batches("train", 64, train=True, augment=True)
    batches = list(tb)
    assert len(batches) == len(tb) and all(b[0].shape == (64, 1, 8, 8) for b in batches)
