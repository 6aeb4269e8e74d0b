"""What the per-sample augmentation costs, as a share of a `cnn` training step on real images.

One step = a batch of 128 OrganAMNIST / BloodMNIST training images through the default `cnn` (forward, backward,
Adam step), with the batch made by ``training.augment.Augmenter`` with the dataset's ``augment=auto`` ops, or by
the plain uint8 -> float conversion. Both alternate in one process; the table gives the medians of the repeats
and the relative cost. Target (issue: recipes): at most 10% of a cnn training step.

    python benchmarks/augment_cost.py [--steps 40] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import real_data_dir, write_section

import zoo
from training.core import policy
from training.core.augment import Augmenter
from training.core.data import load_dataset
from training.core.devices import to_input
from training.core.optim import make_optimizer

BATCH = 128


def step_seconds(model, optimizer, images, labels, make_batch, steps: int) -> float:
    model.train()
    started = time.perf_counter()
    for i in range(steps):
        index = torch.arange(i * BATCH, (i + 1) * BATCH) % len(images)
        x = make_batch(images[index]).contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def augmentation_seconds(augment, images, steps: int) -> float:
    started = time.perf_counter()
    for i in range(steps):
        augment(images[torch.arange(i * BATCH, (i + 1) * BATCH) % len(images)])
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for name in ("organamnist", "bloodmnist"):
        data = load_dataset(name, real_data_dir())
        ops = policy.auto_augment(name, data.channels)
        augment = Augmenter(ops, torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        model = zoo.create_model("cnn", in_chans=data.channels, num_classes=data.num_classes)
        model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer("adam", model, 1e-3, 0.0)
        images, labels = data.train.images, data.train.labels
        step_seconds(model, optimizer, images, labels, augment, 3)  # warm-up
        plain, augmented, alone = [], [], []
        for _ in range(args.repeats):
            plain.append(step_seconds(model, optimizer, images, labels, to_input, args.steps))
            augmented.append(step_seconds(model, optimizer, images, labels, augment, args.steps))
            alone.append(augmentation_seconds(augment, images, args.steps))
        p, a, o = (statistics.median(v) * 1000 for v in (plain, augmented, alone))
        rows.append(f"| {name} | {', '.join(ops)} | {p:.1f} | {a:.1f} | {o:.2f} | {o / p:.1%} | {(a - p) / p:+.1%} |")
        print(rows[-1], flush=True)
    body = (
        f"## Augmentation cost, `cnn` training step, batch {BATCH}, real 28 px images\n\n"
        f"Medians of {args.repeats} alternating repeats of {args.steps} steps. The augmentation is each dataset's "
        "`augment=auto` (every op drawn per image). Reproduce: `python benchmarks/augment_cost.py`. "
        "Target: at most 10% of a cnn training step.\n\n"
        "| dataset | ops | plain step (ms) | augmented step (ms) | augmentation alone (ms) | "
        "augmentation / plain step | augmented vs plain step |\n"
        "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    write_section("augment_cost", body)


if __name__ == "__main__":
    main()
