"""CIFAR-100 offline as typed: the shared exact copy is the default source (recorded with its sha256, hashed once),
the coarse labels (20 classes, their own dataset key), and the clear stop when neither the copy nor torchvision's
files exist."""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, TINY, compose_cfg
from kdx.data import CIFAR100DataModule
from kdx.data.cifar import CIFAR100_COARSE_CLASSES
from kdx.errors import ConfigError

# the offline data folder: $KDX_DATA when set (a checkout elsewhere), else ../shared/data
DATA = Path(os.environ.get("KDX_DATA") or SHARED_DATA)
COPY = DATA / "cifar100" / "cifar100.npz"
needs_copy = pytest.mark.skipif(not COPY.is_file(), reason=f"{COPY} not present")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _tiny_npz(path: Path, n: int = 200, coarse: bool = True) -> Path:
    """A raw-layout array file of 100 fine classes (2 per class) and their coarse labels (fine // 5)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "test"):
        y = np.arange(n) % 100
        arrays.update({f"{split}_x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), f"{split}_labels": y})
        if coarse:
            arrays[f"{split}_coarse_labels"] = y // 5
    if coarse:
        arrays["coarse_class_names"] = np.array([f"super{i}" for i in range(20)])
    np.savez(path, **arrays)
    return path


@needs_copy
def test_data_cifar100_reads_the_shared_copy_and_records_it(tmp_path, one_thread):
    """`data=cifar100` with no other data setting: the copy is read, results.json names it with its sha256."""
    from kdx.run import run

    cfg = compose_cfg([o for o in TINY if not o.startswith("data")] + [
        "data=cifar100", f"paths.data_dir={DATA}", f"paths.cache_dir={tmp_path / 'cache'}", "task=train",
        "data.subset=200", "data.test_subset=100", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    ], tmp_path)
    assert cfg.data.npz_path == str(COPY) and cfg.data.labels == "fine"
    res = run(cfg)
    assert res["status"] == "complete" and res["dataset"] == "cifar100-subset200"
    d = res["data"]
    assert d["source"] == f"npz:{COPY}" and d["source_file"] == str(COPY) and d["labels"] == "fine"
    assert d["num_classes"] == 100 and d["class_names"][:2] == ["apple", "aquarium_fish"]
    assert d["source_sha256"] == _sha256(COPY)
    assert d["sizes"] == {"train": 200, "val": 0, "test": 100, "full_train": 50000, "full_test": 10000}
    assert len(list((tmp_path / "cache" / "arrays").glob("cifar100-*/sha256"))) == 1  # hashed once, kept


@needs_copy
def test_coarse_labels_of_the_shared_copy(tmp_path):
    fine = CIFAR100DataModule(root=str(tmp_path), npz_path=str(COPY), download=False, cache_dir=str(tmp_path))
    coarse = CIFAR100DataModule(root=str(tmp_path), npz_path=str(COPY), download=False, cache_dir=str(tmp_path),
                                labels="coarse")
    assert coarse.num_classes == 20 and coarse.class_names == CIFAR100_COARSE_CLASSES  # known before loading
    fine.setup()
    coarse.setup()
    f2c = np.load(COPY)["fine_to_coarse"]
    for split in ("train_dataset", "test_dataset"):
        yf, yc = getattr(fine, split).labels, getattr(coarse, split).labels
        assert np.array_equal(yc, f2c[yf]) and np.bincount(yc).tolist() == [len(yc) // 20] * 20
    assert coarse.describe()["class_names"] == CIFAR100_COARSE_CLASSES and coarse.describe()["labels"] == "coarse"
    assert coarse.dataset_key == "cifar100-coarse" and fine.dataset_key == "cifar100"


def test_coarse_through_the_config(tmp_path):
    from kdx.build import instantiate_unwrapped

    cfg = compose_cfg(["data=cifar100", "data.labels=coarse", "data.subset=100"], tmp_path)
    dm = instantiate_unwrapped(cfg.data)
    assert dm.num_classes == 20 and dm.dataset_key == "cifar100-coarse-subset100"
    with pytest.raises(ConfigError, match="data.labels='superclass'"):
        instantiate_unwrapped(compose_cfg(["data=cifar100", "data.labels=superclass"], tmp_path).data)


def test_missing_copy_and_torchvision_files_stop_with_the_settings_to_change(tmp_path):
    from kdx.build import instantiate_data

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_cfg(["data=cifar100", f"paths.data_dir={empty}", "data.download=false"], tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        instantiate_data(cfg.data)
    msg = str(err.value)
    assert "CIFAR-100 not found" in msg and f"data.root={str(empty)!r}" in msg
    assert f"data.npz_path={str(empty / 'cifar100' / 'cifar100.npz')!r}" in msg and "download" in msg


def test_array_file_is_read_before_torchvision_files(tmp_path):
    """CIFAR-100's array copy is exact: source=auto reads it without touching torchvision's files."""
    class Untouchable:
        def __init__(self, *a, **k):
            raise AssertionError("torchvision's files were read although the array file exists")

    dm = CIFAR100DataModule(root=str(tmp_path), npz_path=str(_tiny_npz(tmp_path / "c.npz")), download=False,
                            cache_dir=str(tmp_path / "cache"))
    dm.tv_class = Untouchable
    dm.setup()
    assert dm.source == f"npz:{tmp_path / 'c.npz'}" and dm.train_size == 200
    assert dm.describe()["source_sha256"] == _sha256(tmp_path / "c.npz")


def test_coarse_labels_from_an_array_file_and_from_torchvision_files(tmp_path):
    npz = _tiny_npz(tmp_path / "c.npz")
    dm = CIFAR100DataModule(root=str(tmp_path), npz_path=str(npz), labels="coarse", cache_dir=str(tmp_path))
    dm.setup()
    assert dm.train_dataset.labels.tolist() == (np.arange(200) % 100 // 5).tolist()
    assert dm.class_names == CIFAR100_COARSE_CLASSES  # the official names, as for the fine labels
    no_coarse = CIFAR100DataModule(root=str(tmp_path), npz_path=str(_tiny_npz(tmp_path / "f.npz", coarse=False)),
                                   labels="coarse", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.labels=coarse.*train_coarse_labels"):
        no_coarse.setup()

    folder = tmp_path / "tv" / "cifar-100-python"  # torchvision's pickles (their md5 check is faked below)
    folder.mkdir(parents=True)
    for split, n in (("train", 40), ("test", 20)):
        (folder / split).write_bytes(pickle.dumps({"coarse_labels": [(3 * i) % 20 for i in range(n)]}))
    (folder / "meta").write_bytes(pickle.dumps({"coarse_label_names": list(CIFAR100_COARSE_CLASSES)}))

    class FakeCIFAR100:
        base_folder, train_list, test_list = "cifar-100-python", [["train", None]], [["test", None]]
        meta = {"filename": "meta", "key": "fine_label_names"}
        classes = ["c"] * 100

        def __init__(self, root, train=True, download=False):
            n = 40 if train else 20
            self.data, self.targets = np.zeros((n, 32, 32, 3), np.uint8), list(range(n))

    tv = CIFAR100DataModule(root=str(tmp_path / "tv"), npz_path=None, download=False, labels="coarse")
    tv.tv_class = FakeCIFAR100
    tv.setup()
    assert tv.train_dataset.labels.tolist() == [(3 * i) % 20 for i in range(40)] and len(tv.test_dataset) == 20
    assert tv.describe()["source_file"] == str(tmp_path / "tv") and tv.describe()["source_sha256"] is None


def test_file_sha256_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import kdx.data.npz as npz

    f = _tiny_npz(tmp_path / "a.npz", n=100)
    digest = npz.file_sha256(f, str(tmp_path / "cache"))
    assert digest == _sha256(f)
    monkeypatch.setattr(npz, "sha256_file", lambda p: pytest.fail("hashed again"))
    assert npz.file_sha256(f, str(tmp_path / "cache")) == digest
    monkeypatch.undo()
    _tiny_npz(f, n=120)  # another file under the same path (size and mtime change): hashed again
    os.utime(f, ns=(1, 1))
    assert npz.file_sha256(f, str(tmp_path / "cache")) == _sha256(f) != digest
