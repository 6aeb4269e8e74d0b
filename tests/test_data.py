import numpy as np
import pytest
import torch
from medmnist import INFO

from tests.helpers.data import write_idx, write_synthetic_medmnist
from tests.helpers.paths import REAL_DATA_DIR, requires_real_data
from training.core.data import (
    DatasetError,
    Split,
    list_datasets,
    load_dataset,
    resolve_data_dir,
    stratified_subset,
)


def test_supported_datasets_are_the_2d_single_label_ones():
    supported = list_datasets()
    assert {"organamnist", "bloodmnist", "breastmnist", "pathmnist", "dermamnist", "retinamnist"} <= set(supported)
    assert {"mnist", "fashionmnist"} <= set(supported)
    assert "chestmnist" not in supported and not any(name.endswith("3d") for name in supported)


def test_synthetic_file_loads_as_uint8_tensors_with_medmnist_labels(synthetic_env):
    data = load_dataset("bloodmnist")
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (96, 3, 28, 28)
    assert data.val.images.shape == (48, 3, 28, 28) and data.test.labels.shape == (48,)
    assert data.class_names == [INFO["bloodmnist"]["label"][str(i)] for i in range(8)]
    assert data.task == "multi-class" and data.channels == 3 and data.num_classes == 8
    mean, std = data.channel_stats()
    pixels = data.train.images.double() / 255
    assert mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist())
    assert std == pytest.approx(pixels.std(dim=(0, 2, 3)).tolist(), rel=1e-3)


def test_grayscale_gets_a_channel_axis(synthetic_env):
    data = load_dataset("breastmnist")
    assert data.train.images.shape == (96, 1, 28, 28) and data.task == "binary-class"


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDZOO_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("MEDZOO_DATA_DIR")
    assert resolve_data_dir(None).name == ".medmnist"


def test_resize_to_other_sizes(synthetic_env):
    data = load_dataset("organamnist", size=64)
    assert data.train.images.shape == (96, 1, 64, 64) and data.size == 64 and data.native_size == 28
    assert any("resized" in note for note in data.notes)


def test_native_size_file_is_preferred_when_present(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDZOO_VERIFY_MD5", "0")
    write_synthetic_medmnist(tmp_path / "breastmnist.npz", "breastmnist")
    write_synthetic_medmnist(tmp_path / "breastmnist_64.npz", "breastmnist", size=64)
    data = load_dataset("breastmnist", tmp_path, size=64)
    assert data.native_size == 64 and data.source.endswith("breastmnist_64.npz") and not data.notes


def test_max_train_samples_is_stratified_and_seeded():
    labels = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    split = Split(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), labels)
    subset = stratified_subset(split, 20, seed=3)
    assert len(subset) == 20 and subset.labels.bincount().tolist() == [16, 3, 1]
    again = stratified_subset(split, 20, seed=3)
    other = stratified_subset(split, 20, seed=4)
    assert torch.equal(subset.images, again.images) and not torch.equal(subset.images, other.images)
    assert len(stratified_subset(split, 2, seed=0)) == 2  # fewer samples than classes: still exactly n


@pytest.mark.parametrize(
    "name, message",
    [
        ("chestmnist", "multi-label"),
        ("organmnist3d", "3-D"),
        ("organmnist", "Did you mean"),
    ],
)
def test_unsupported_and_unknown_datasets(name, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(name)


def test_missing_file_offline_says_where_to_put_it(tmp_path):
    try:
        load_dataset("breastmnist", tmp_path / "empty")
    except DatasetError as err:
        assert f"place the official file at {tmp_path / 'empty' / 'breastmnist.npz'}" in str(err)
        assert not (tmp_path / "empty" / "breastmnist.npz").exists()  # no partial download left behind
    else:
        pytest.skip("this machine is online: the download succeeded")


def test_failed_mnist_download_leaves_no_empty_folders(tmp_path):
    try:
        load_dataset("fashionmnist", tmp_path)
    except DatasetError as err:
        assert "place the four idx files" in str(err)
        assert list(tmp_path.iterdir()) == []
    else:
        pytest.skip("this machine is online: the download succeeded")


def test_corrupt_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDZOO_VERIFY_MD5", "0")
    (tmp_path / "breastmnist.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset("breastmnist", tmp_path)


def test_bad_md5_is_a_clear_error(tmp_path):
    write_synthetic_medmnist(tmp_path / "breastmnist.npz", "breastmnist")
    with pytest.raises(DatasetError, match=f"official breastmnist.npz has {INFO['breastmnist']['MD5']}"):
        load_dataset("breastmnist", tmp_path)


def test_missing_keys_and_wrong_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDZOO_VERIFY_MD5", "0")
    np.savez(tmp_path / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match="lacks the keys"):
        load_dataset("breastmnist", tmp_path)
    arrays = {
        f"{s}_{k}": np.zeros((2, 28, 28, 3) if k == "images" else (2, 1), np.uint8)
        for s in ("train", "val", "test")
        for k in ("images", "labels")
    }
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(DatasetError, match=r"expected \(N, 28, 28\) uint8"):
        load_dataset("breastmnist", tmp_path)
    arrays.update({f"{s}_images": np.zeros((2, 28, 28), np.uint8) for s in ("train", "val", "test")})
    arrays["train_labels"] = np.array([[0], [7]], np.uint8)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(DatasetError, match=r"range over \[0, 7\]; expected \[0, 1\]"):
        load_dataset("breastmnist", tmp_path)


def test_mnist_from_torchvision_files_gets_a_fixed_validation_split(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    train_labels = np.arange(200) % 10
    write_idx(raw, "train-images-idx3-ubyte", rng.integers(0, 255, (200, 28, 28)))
    write_idx(raw, "train-labels-idx1-ubyte", train_labels)
    write_idx(raw, "t10k-images-idx3-ubyte", rng.integers(0, 255, (50, 28, 28)))
    write_idx(raw, "t10k-labels-idx1-ubyte", np.arange(50) % 10)
    data = load_dataset("mnist", tmp_path, download=False)
    assert (len(data.train), len(data.val), len(data.test)) == (180, 20, 50)
    assert data.val.labels.bincount().tolist() == [2] * 10  # stratified
    again = load_dataset("mnist", tmp_path, download=False, seed=123)  # the training seed does not move it
    assert torch.equal(data.val.images, again.val.images)
    assert data.class_names[0] == "0" and data.channels == 1


@requires_real_data
def test_official_files_pass_the_md5_check_and_have_official_counts():
    for flag in ("breastmnist", "bloodmnist"):
        data = load_dataset(flag, REAL_DATA_DIR)
        counts = INFO[flag]["n_samples"]
        assert (len(data.train), len(data.val), len(data.test)) == (counts["train"], counts["val"], counts["test"])
