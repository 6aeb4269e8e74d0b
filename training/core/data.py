"""Datasets as uint8 tensors in memory: MedMNIST npz files and torchvision's MNIST / Fashion-MNIST.

One interface for all of them: :func:`load_dataset` returns train/val/test :class:`Split` s, class names,
channels and task. Images stay uint8 [N, C, H, W]; models normalise inside themselves
(:class:`zoo.NormalizedClassifier`), so only the statistics are computed here.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from medmnist import INFO

DATA_DIR_ENV = "MEDZOO_DATA_DIR"
VERIFY_MD5_ENV = "MEDZOO_VERIFY_MD5"
DEFAULT_DATA_DIR = Path("~/.medmnist")
SUPPORTED_TASKS = ("multi-class", "binary-class", "ordinal-regression")
NATIVE_SIZES = (28, 64, 128, 224)
TORCHVISION_DATASETS = {
    "mnist": ("MNIST", [str(d) for d in range(10)]),
    "fashionmnist": (
        "FashionMNIST",
        ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"],
    ),
}
# Fashion/MNIST ship no validation split; this fixed seed carves the same one for every run.
VAL_SPLIT_SEED = 20240101
VAL_FRACTION = 0.1
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset that cannot be used: unknown, unsupported, missing offline, or corrupt."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    # A corrupted copy of ``images`` (same order) that training draws from with probability corruption_augment.
    corrupted: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageDataset:
    name: str
    task: str
    class_names: list[str]
    channels: int
    native_size: int
    size: int
    train: Split
    val: Split
    test: Split
    source: str  # the local file or folder read
    origin: str  # where the official file is published
    digest: str
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training split in [0, 1] units (z-score normalisation)."""
        pixels = self.train.images.transpose(0, 1).reshape(self.channels, -1).double() / 255.0
        std = pixels.std(dim=1).clamp_min(1e-3)
        return tuple(pixels.mean(dim=1).tolist()), tuple(std.tolist())


def card_data(dataset: ImageDataset) -> dict:
    """What a model card says of the data: the dataset's own description and license, the split sizes and the
    training images per class."""
    if dataset.name in TORCHVISION_DATASETS:
        description, license_ = f"{TORCHVISION_DATASETS[dataset.name][0]} (torchvision), {dataset.origin}.", ""
    else:
        description, license_ = INFO[dataset.name]["description"], INFO[dataset.name]["license"]
    counts = torch.bincount(dataset.train.labels.long().flatten(), minlength=dataset.num_classes).tolist()
    return {
        "description": description,
        "license": license_,
        "splits": {name: len(dataset.split(name)) for name in ("train", "val", "test")},
        "class_counts": dict(zip(dataset.class_names, counts)),
    }


def list_datasets() -> list[str]:
    """Every 2-D single-label MedMNIST dataset, then MNIST and Fashion-MNIST."""
    medmnist_2d = [flag for flag, info in INFO.items() if not flag.endswith("3d") and info["task"] in SUPPORTED_TASKS]
    return medmnist_2d + list(TORCHVISION_DATASETS)


def dataset_info(name: str) -> dict:
    """Task, channels, class names and the training split's size without touching any file."""
    check_dataset_name(name)
    if name in TORCHVISION_DATASETS:
        train = 60_000 - max(1, int(60_000 * VAL_FRACTION))  # MNIST and Fashion-MNIST: 60,000, less validation
        return {"task": "multi-class", "channels": 1, "class_names": TORCHVISION_DATASETS[name][1], "train": train}
    info = INFO[name]
    labels = info["label"]
    return {
        "task": info["task"],
        "channels": info["n_channels"],
        "class_names": [labels[str(i)] for i in range(len(labels))],
        "train": info["n_samples"]["train"],
    }


def check_dataset_name(name: str) -> None:
    supported = list_datasets()
    if name in supported:
        return
    if name in INFO:
        info = INFO[name]
        why = "is 3-D (volumes)" if name.endswith("3d") else f"is {info['task']}"
        raise DatasetError(
            f"Dataset {name!r} {why}; MedZoo classifies 2-D images with one label each. "
            f"Supported: {', '.join(supported)}."
        )
    close = difflib.get_close_matches(name, supported, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DatasetError(f"Unknown dataset {name!r}.{hint} Supported: {', '.join(supported)}.")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The ``data_dir`` argument, else ``$MEDZOO_DATA_DIR``, else ``~/.medmnist``."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser().resolve()


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    size: int = 28,
    max_train_samples: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> ImageDataset:
    """Load ``name`` at ``size`` px, downloading into the data directory if the file is absent."""
    check_dataset_name(name)
    if size < 1:
        raise DatasetError(f"size={size} must be a positive number of pixels.")
    root = resolve_data_dir(data_dir)
    if name in TORCHVISION_DATASETS:
        dataset = _load_torchvision(name, root, download)
    else:
        dataset = _load_medmnist(name, root, size, download)
    if dataset.native_size != size:
        dataset.notes.append(f"resized from {dataset.native_size} px to {size} px (bilinear, antialiased)")
        for split_name in SPLITS:
            split = dataset.split(split_name)
            split.images = resize_images(split.images, size)
    dataset.size = size
    if max_train_samples:
        dataset.train = stratified_subset(dataset.train, max_train_samples, seed)
    return dataset


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 [N, C, H, W] (PIL's BILINEAR, which serving uses)."""
    out = []
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk].float()
        resized = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``n`` samples with the class proportions of ``labels`` (each class keeps one)."""
    generator = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    share = counts.double() * n / len(labels)
    quota = share.floor().long().clamp_min(1)
    while quota.sum() > n:  # "at least one per class" can overshoot tiny budgets
        quota[quota.argmax()] -= 1
    leftovers = n - int(quota.sum())
    if leftovers:
        quota[(share - quota.double()).argsort(descending=True)[:leftovers]] += 1
    chosen = []
    for cls, k in zip(classes.tolist(), quota.tolist()):
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def stratified_subset(split: Split, n: int, seed: int) -> Split:
    """A seeded, stratified subsample of ``n`` samples (training-set-size studies)."""
    if n < 1:
        raise DatasetError(f"max_train_samples={n} must be >= 1.")
    if n >= len(split):
        return split
    index = stratified_indices(split.labels, n, seed)
    return Split(split.images[index], split.labels[index])


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _md5_checks_enabled() -> bool:
    return os.environ.get(VERIFY_MD5_ENV, "1").lower() not in ("0", "false", "no")


def _medmnist_file(name: str, root: Path, size: int) -> tuple[Path, int, str, str]:
    """The file to read: the native-size file if it is already present, else the 28 px file."""
    info = INFO[name]
    if size in NATIVE_SIZES and size != 28:
        native = root / f"{name}_{size}.npz"
        if native.exists():
            return native, size, info[f"url_{size}"], info[f"MD5_{size}"]
    return root / f"{name}.npz", 28, info["url"], info["MD5"]


def _download(url: str, path: Path, md5: str | None) -> None:
    from torchvision.datasets.utils import download_url

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url(url, str(path.parent), path.name, md5)
    except Exception as err:  # network errors come in many types; all mean the same to the user
        path.unlink(missing_ok=True)
        raise DatasetError(
            f"{path.name} is not in {path.parent} and downloading it from {url} failed "
            f"({type(err).__name__}: {err}). Without internet, place the official file at {path} "
            f"(or point data_dir / ${DATA_DIR_ENV} at the folder that holds it)."
        ) from err


def _load_medmnist(name: str, root: Path, size: int, download: bool) -> ImageDataset:
    path, native_size, url, expected_md5 = _medmnist_file(name, root, size)
    if not path.exists():
        if not download:
            raise DatasetError(f"{path.name} is not in {root}; place the official file at {path}.")
        _download(url, path, expected_md5)
    digest = md5sum(path)
    if _md5_checks_enabled() and digest != expected_md5:
        raise DatasetError(
            f"{path} has MD5 {digest}, but the official {path.name} has {expected_md5}: the file is corrupt or "
            f"not the official release. Delete it to download it again (or set {VERIFY_MD5_ENV}=0 for your own data)."
        )
    info = dataset_info(name)
    splits = _read_npz(path, info["channels"], len(info["class_names"]), native_size)
    return ImageDataset(
        name=name,
        task=info["task"],
        class_names=info["class_names"],
        channels=info["channels"],
        native_size=native_size,
        size=native_size,
        source=str(path),
        origin=url,
        digest=digest,
        **splits,
    )


def _read_npz(path: Path, channels: int, num_classes: int, size: int) -> dict[str, Split]:
    try:
        archive = np.load(path)
    except Exception as err:
        raise DatasetError(f"{path} is not a readable .npz archive ({type(err).__name__}: {err}).") from err
    with archive:
        expected = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
        missing = [k for k in expected if k not in archive.files]
        if missing:
            raise DatasetError(f"{path} lacks the keys {missing}; a MedMNIST file has {expected}.")
        splits = {}
        for split in SPLITS:
            try:
                images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
            except Exception as err:
                raise DatasetError(f"{path}: cannot read the {split} split ({type(err).__name__}: {err}).") from err
            splits[split] = _to_split(path, split, images, labels, channels, num_classes, size)
    return splits


def _to_split(path, split, images, labels, channels, num_classes, size) -> Split:
    shape = (size, size) if channels == 1 else (size, size, channels)
    if images.dtype != np.uint8 or images.ndim != 1 + len(shape) or tuple(images.shape[1:]) != shape:
        raise DatasetError(
            f"{path}: {split}_images has shape {images.shape} and dtype {images.dtype}; "
            f"expected (N, {', '.join(map(str, shape))}) uint8."
        )
    labels = labels.reshape(len(labels), -1)
    if labels.shape != (len(images), 1):
        raise DatasetError(f"{path}: {split}_labels has shape {labels.shape}; expected ({len(images)}, 1).")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path}: {split}_labels range over [{labels.min()}, {labels.max()}]; expected [0, {num_classes - 1}]."
        )
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor.unsqueeze(1) if channels == 1 else tensor.permute(0, 3, 1, 2).contiguous()
    return Split(tensor, torch.from_numpy(labels[:, 0].astype(np.int64)))


def _load_torchvision(name: str, root: Path, download: bool) -> ImageDataset:
    import torchvision.datasets as tvd

    class_name, class_names = TORCHVISION_DATASETS[name]
    dataset_cls = getattr(tvd, class_name)
    folder = root / class_name
    existed = folder.exists()
    try:
        parts = {train: dataset_cls(str(root), train=train, download=download) for train in (True, False)}
    except RuntimeError as err:
        if not existed:  # torchvision creates <root>/<Name>/raw before downloading; leave no empty folders
            _remove_empty_tree(folder)
        raise DatasetError(
            f"{class_name} is not in {root / class_name / 'raw'} and could not be downloaded ({err}). "
            f"Without internet, place the four idx files (train-images-idx3-ubyte, ...) there."
        ) from err
    except (EOFError, OSError, ValueError) as err:
        raise DatasetError(f"{class_name} files in {root / class_name} are corrupt ({err}).") from err
    full_train, test = parts[True], parts[False]
    train, val = _carve_val_split(Split(full_train.data.unsqueeze(1), full_train.targets.long()))
    digest = hashlib.md5(full_train.data.numpy().tobytes()[: 1 << 20]).hexdigest()
    return ImageDataset(
        name=name,
        task="multi-class",
        class_names=class_names,
        channels=1,
        native_size=28,
        size=28,
        train=train,
        val=val,
        test=Split(test.data.unsqueeze(1), test.targets.long()),
        source=str(root / class_name),
        origin=dataset_cls.mirrors[0],
        digest=digest,
        notes=[f"validation split: a fixed stratified {VAL_FRACTION:.0%} of train (seed {VAL_SPLIT_SEED})"],
    )


def _remove_empty_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)) + [folder]:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _carve_val_split(train: Split) -> tuple[Split, Split]:
    is_val = torch.zeros(len(train), dtype=torch.bool)
    is_val[stratified_indices(train.labels, max(1, int(len(train) * VAL_FRACTION)), VAL_SPLIT_SEED)] = True
    return Split(train.images[~is_val], train.labels[~is_val]), Split(train.images[is_val], train.labels[is_val])
