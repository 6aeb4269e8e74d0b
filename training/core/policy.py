"""What is valid for each dataset: which augmentations and test-time views keep the label true.

Left and right are anatomy in the abdominal CT sets (OrganA/C/S) and chest X-rays, so they get no flips;
blood cells, pathology tiles, skin lesions and retina images have no orientation, so every flip and
rotation is valid; digits must not be flipped.
"""

from __future__ import annotations

from training.core.augment import OPS, AugmentError, check_ops
from training.core.options import AUTO, NONE
from zoo.tta import VIEWS

ORIENTATION_FREE = ("bloodmnist", "pathmnist", "dermamnist", "retinamnist", "tissuemnist")
NO_FLIPS = ("organamnist", "organcmnist", "organsmnist", "pneumoniamnist", "chestmnist", "mnist")
LEFT_RIGHT_FREE = ("breastmnist", "octmnist", "fashionmnist")


def auto_augment(dataset: str, channels: int) -> tuple[str, ...]:
    """Lossless ops only: at 28 px the bilinear resampling of ``affine`` blurs every training image. Adding it
    lowered validation ACC on OrganAMNIST (0.986 against 0.989, width 24, 16 epochs) and BloodMNIST (0.973 against
    0.979, width 24, 40 epochs); benchmarks/RESULTS.md, "Choosing the recipes"."""
    if dataset in ORIENTATION_FREE:
        ops = ("hflip", "vflip", "rot90", "translate")
    elif dataset in LEFT_RIGHT_FREE:
        ops = ("hflip", "translate")
    else:
        ops = ("translate",)
    return ops + (("color",) if channels == 3 else ())


def auto_tta(dataset: str) -> tuple[str, ...]:
    if dataset in ORIENTATION_FREE:
        return ("identity", "hflip", "vflip", "rot180")
    if dataset in LEFT_RIGHT_FREE:
        return ("identity", "hflip")
    return ("identity", "shift_left", "shift_right", "shift_up", "shift_down")


def invalid_for(dataset: str, ops) -> list[str]:
    """Flips or rotations asked for a dataset whose orientation carries meaning."""
    if dataset in ORIENTATION_FREE:
        return []
    bad = {"vflip", "rot90", "rot180", "rot270"} | ({"hflip"} if dataset in NO_FLIPS else set())
    return [op for op in ops if op in bad]


def resolve_augment(spec: str, dataset: str, channels: int) -> tuple[str, ...]:
    """``none``, ``auto`` or a comma list of ops; a flip the dataset forbids is refused."""
    if spec == NONE:
        return ()
    if spec == AUTO:
        return auto_augment(dataset, channels)
    ops = check_ops(op.strip() for op in spec.split(",") if op.strip())
    bad = invalid_for(dataset, ops)
    if bad:
        raise AugmentError(
            f"augment={spec!r}: {', '.join(bad)} would change the label on {dataset} (orientation is anatomy "
            f"there); valid for it: {', '.join(op for op in OPS if op not in invalid_for(dataset, OPS))}."
        )
    return ops


def resolve_tta(spec: str, dataset: str) -> tuple[str, ...]:
    if spec == NONE:
        return ()
    if spec == AUTO:
        return auto_tta(dataset)
    views = tuple(v.strip() for v in spec.split(",") if v.strip())
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise AugmentError(f"tta={spec!r}: {', '.join(unknown) or 'no view'}; allowed: none, auto, {', '.join(VIEWS)}.")
    bad = invalid_for(dataset, views)
    if bad:
        raise AugmentError(f"tta={spec!r}: {', '.join(bad)} would change the label on {dataset}.")
    return views
