"""The object-store workspace ($SHRINKFLOW_ARTIFACTS) against moto's S3 server: publish and pull whole
folders, readers never see half a stage, content hashes make re-pulls cheap, clear errors for a dead
endpoint or a missing bucket, and a pipeline whose stages run on two workers that share no disk."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tasks import object_store
from tasks.errors import ConfigError, ServiceError
from tasks.stage_runner import run_stage
from tasks.workspace import run_paths

PIPELINE = """
pipelines:
  tiny:
    data: {source: synthetic, num_samples: 300, image_size: 8, num_classes: 4}
    model: {name: resnet8, kwargs: {width: 8}}
    train: {epochs: 1, batch_size: 32, lr: 0.05}
    goal: {speedup: 1.3, metric: macs, max_accuracy_drop: 50.0}
    compression: {sensitivity: {enabled: false}}
    finetune: {epochs: 1, batch_size: 32, lr: 0.01}
    targets: [host]
"""


@pytest.fixture
def store(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> object_store.ObjectStore:
    monkeypatch.setenv(object_store.ENV, f"s3://{s3_bucket}/ws")
    return object_store.current()


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_publish_then_pull_gives_the_same_folder(store, tmp_path):
    src = _folder(tmp_path / "a", {"model.pt": b"weights" * 1000, "sub/metrics.json": b'{"acc": 1}'})
    record = store.publish(src, "runs/p/r/train_base")
    assert set(record["files"]) == {"model.pt", "sub/metrics.json"}
    dest = tmp_path / "b" / "train_base"
    assert store.pull("runs/p/r/train_base", dest, tmp_path / "b" / "blobs")
    assert (dest / "model.pt").read_bytes() == b"weights" * 1000
    assert json.loads((dest / "sub" / "metrics.json").read_text()) == {"acc": 1}
    assert not store.pull("runs/p/r/never_published", tmp_path / "b" / "x", tmp_path / "b" / "blobs")


def test_a_repeated_pull_downloads_nothing_and_shared_content_is_uploaded_once(store, tmp_path, monkeypatch):
    src = _folder(tmp_path / "a", {"big.bin": b"x" * 200_000, "small.txt": b"1"})
    store.publish(src, "runs/p/r1/s")
    uploads: list[str] = []
    real_put = store.fs.put_file
    monkeypatch.setattr(store.fs, "put_file", lambda a, b, **k: (uploads.append(a), real_put(a, b, **k)))
    _folder(tmp_path / "c", {"big.bin": b"x" * 200_000, "small.txt": b"2"})
    store.publish(tmp_path / "c", "runs/p/r2/s")
    assert [Path(u).name for u in uploads] == ["small.txt"]  # big.bin's content was there already

    downloads: list[str] = []
    real_get = store.fs.get_file
    monkeypatch.setattr(store.fs, "get_file", lambda a, b, **k: (downloads.append(a), real_get(a, b, **k)))
    blobs = tmp_path / "w" / "blobs"
    store.pull("runs/p/r1/s", tmp_path / "w" / "r1", blobs)
    assert len(downloads) == 2
    store.pull("runs/p/r1/s", tmp_path / "w" / "r1", blobs)  # already here: nothing to fetch
    store.pull("runs/p/r2/s", tmp_path / "w" / "r2", blobs)  # only the file it does not share
    assert len(downloads) == 3


def test_a_publish_cut_short_leaves_readers_the_previous_folder(store, tmp_path, monkeypatch):
    store.publish(_folder(tmp_path / "v1", {"a.txt": b"v1-a", "b.txt": b"v1-b"}), "runs/p/r/s")
    real_put = store.fs.put_file
    calls = []

    def dies_on_second(a, b, **k):
        calls.append(a)
        if len(calls) == 2:
            raise ConnectionResetError("connection reset by peer")
        return real_put(a, b, **k)

    monkeypatch.setattr(store.fs, "put_file", dies_on_second)
    with pytest.raises(ServiceError, match="uploading"):
        store.publish(_folder(tmp_path / "v2", {"a.txt": b"v2-a", "b.txt": b"v2-b"}), "runs/p/r/s")
    dest = tmp_path / "reader" / "s"
    store.pull("runs/p/r/s", dest, tmp_path / "reader" / "blobs")
    assert (dest / "a.txt").read_bytes() == b"v1-a" and (dest / "b.txt").read_bytes() == b"v1-b"


def test_a_corrupt_blob_is_refused(store, tmp_path):
    src = _folder(tmp_path / "a", {"model.pt": b"good bytes"})
    rec = store.publish(src, "runs/p/r/s")
    store.fs.pipe_file(store.key(f"blobs/{rec['files']['model.pt']['sha256']}"), b"evil bytes")
    with pytest.raises(ServiceError, match="arrived corrupt"):
        store.pull("runs/p/r/s", tmp_path / "b" / "s", tmp_path / "b" / "blobs")
    assert not (tmp_path / "b" / "s").exists()  # nothing half-materialised


def test_a_missing_bucket_and_a_dead_endpoint_say_what_to_fix(s3_bucket, monkeypatch):
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        object_store.ObjectStore("s3://no-such-bucket/ws").check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match=r"object store s3://x/ws: .*AWS_ENDPOINT_URL"):
        object_store.ObjectStore("s3://x/ws").check()
    assert time.monotonic() - t0 < 60


def test_a_bad_url_is_a_config_error():
    with pytest.raises(ConfigError, match="not a usable object-store URL"):
        object_store.ObjectStore("nosuchproto://bucket/x")


def test_stages_on_two_workers_that_share_no_disk(store, tmp_path, monkeypatch):
    """prepare_data and train_base run on worker A, the rest on worker B: B pulls A's outputs, its own
    outputs are published, and a third worker sees the run complete and skips every stage."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(PIPELINE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the shared server
    a, b, c = tmp_path / "worker-a", tmp_path / "worker-b", tmp_path / "worker-c"
    for stage in ("prepare_data", "train_base"):
        run_stage(stage, "tiny", "r1", config_path=cfg, workspace=a)
    for stage in ("search", "compress", "finetune"):
        run_stage(stage, "tiny", "r1", config_path=cfg, workspace=b)
    assert not (a / "runs" / "tiny" / "r1" / "finetune").exists()
    state = run_paths("tiny", "r1", b).read_state()
    assert state["completed"] == ["prepare_data", "train_base", "search", "compress", "finetune"]
    # B's train_base is A's bytes, by content hash.
    assert (b / "runs/tiny/r1/train_base/model.pt").read_bytes() == (a / "runs/tiny/r1/train_base/model.pt").read_bytes()
    published = store.manifest("runs/tiny/r1/finetune")
    assert published["digest"] == state["stages"]["finetune"]["outputs"]["digest"]
    for stage in ("prepare_data", "train_base", "search", "compress", "finetune"):
        run_stage(stage, "tiny", "r1", config_path=cfg, workspace=c)  # done: each is pulled, then skipped
    state_c = run_paths("tiny", "r1", c).read_state()
    assert state_c["stages"] == state["stages"]  # nothing re-ran: the records are B's, untouched
    model = c / "runs/tiny/r1/finetune/model.pt"
    assert model.stat().st_nlink >= 2  # linked from C's blob cache, i.e. pulled, not recomputed
