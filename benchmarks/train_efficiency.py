"""How close a training step comes to what this CPU can do: the float32 peak, the FLOPs of one training image
for each recipe's model, and the fraction of the peak that ``train_one_epoch`` achieves.

Peak: the faster of two dense float32 kernels with the same torch build and thread count as training: a
4096 x 4096 ``torch.matmul`` (MKL) and a 1x1 convolution of 1024 channels (oneDNN's GEMM). They differ on AMD
CPUs, where MKL's sgemm takes its AVX2 path and oneDNN uses AVX-512; both are reported.
FLOPs per training image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward pass of a
batch, divided by the batch (convolutions and matmuls, counted as direct convolutions: oneDNN's 3x3 kernels can do
fewer multiplications, so a net of 3x3 convolutions can pass 100%). Achieved: images/s of the product's
``training.core.engine.train_one_epoch`` on OrganAMNIST with the recipes' augmentation, times the FLOPs per image.
Medians over repeats, alternating models.

    python benchmarks/train_efficiency.py [--steps 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, real_data_dir, write_section
from torch.utils.flop_counter import FlopCounterMode

import zoo
from training.core import policy
from training.core.data import Split, load_dataset
from training.core.devices import channels_last, native_bf16, to_batch
from training.core.engine import FitOptions, prepare, train_one_epoch

BATCH = 128
MATMUL_N = 4096
GEMM_CHANNELS = 1024
# (label, zoo model, model options): the recipes' networks and two common baselines.
MODELS = [
    ("resnet9 width 16 (quick)", "resnet9", {"width": 16}),
    ("resnet9 width 24 (best)", "resnet9", {"width": 24}),
    ("cnn (defaults)", "cnn", {}),
    ("mobilenetv2", "mobilenetv2", {}),
]


def _median_rate(call, flops: float, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return flops / statistics.median(times) / 1e9


@torch.no_grad()
def peak_gflops(repeats: int, precision: str) -> dict[str, float]:
    """The dense kernels' rate in ``precision`` (bf16: bfloat16 operands, as autocast gives the convolutions)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype), torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    conv = torch.nn.Conv2d(GEMM_CHANNELS, GEMM_CHANNELS, 1, bias=False).to(dtype, memory_format=torch.channels_last)
    x = torch.randn(64, GEMM_CHANNELS, 28, 28, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return {
        f"matmul {precision}": _median_rate(lambda: torch.matmul(a, b), 2 * MATMUL_N**3, repeats),
        f"1x1 conv {precision} (oneDNN)": _median_rate(lambda: conv(x), 2 * 64 * 28 * 28 * GEMM_CHANNELS**2, repeats),
    }


def make_model(name: str, options: dict, dataset) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = zoo.create_model(name, in_chans=dataset.channels, num_classes=dataset.num_classes, **options)
    mean, std = dataset.channel_stats()
    return zoo.NormalizedClassifier(backbone, mean, std)


def training_flops_per_image(model: torch.nn.Module, images: torch.Tensor) -> float:
    """FLOPs of one forward and backward pass, per image."""
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(to_batch(images)).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(images)


def images_per_second(
    model: torch.nn.Module, dataset, steps: int, augment: tuple[str, ...], precision: str = "fp32"
) -> float:
    train = dataset.train
    options = FitOptions(epochs=1, batch_size=BATCH, lr=1e-3, optimizer="adamw", augment=augment, precision=precision)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))

    def first(batches: int) -> Split:
        return Split(train.images[order[: batches * BATCH]], train.labels[order[: batches * BATCH]])

    with channels_last(model):
        training = prepare(model, first(steps), dataset.num_classes, options)
        train_one_epoch(training, first(3), epoch=0, progress=False)
        stats = train_one_epoch(training, first(steps), epoch=1, progress=False)
    return stats.images / stats.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    dataset = load_dataset("organamnist", real_data_dir())
    augment = policy.resolve_augment("auto", dataset.name, dataset.channels)
    flops = {
        label: training_flops_per_image(make_model(name, options, dataset), dataset.train.images[:BATCH])
        for label, name, options in MODELS
    }
    precisions = ("fp32", "bf16") if native_bf16() else ("fp32",)
    cases = [(label, name, options, p) for label, name, options in MODELS for p in precisions]
    peaks, speeds = {}, {(label, p): [] for label, _, _, p in cases}
    for repeat in range(args.repeats):
        for precision in precisions:
            for kernel, rate in peak_gflops(3, precision).items():
                peaks.setdefault(kernel, []).append(rate)
        for label, name, options, precision in cases if repeat % 2 == 0 else reversed(cases):
            model = make_model(name, options, dataset)
            speeds[label, precision].append(images_per_second(model, dataset, args.steps, augment, precision))
    kernels = {kernel: statistics.median(rates) for kernel, rates in peaks.items()}
    peak = {p: max(v for k, v in kernels.items() if f" {p}" in k) for p in precisions}
    table = [
        "| model | step precision | training MFLOP / image | images/s | vs fp32 | GFLOP/s | of the fp32 peak "
        "| of its precision's peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, _, _, precision in cases:
        rate = statistics.median(speeds[label, precision])
        achieved = rate * flops[label] / 1e9
        ratio = rate / statistics.median(speeds[label, "fp32"])
        table.append(
            f"| {label} | {precision} | {flops[label] / 1e6:.1f} | {rate:.0f} | {ratio:.2f}x | {achieved:.1f} | "
            f"{achieved / peak['fp32']:.1%} | {achieved / peak[precision]:.1%} |"
        )
        print(table[-1], flush=True)
    write_section(
        "train_efficiency",
        (
            "## How close training comes to this CPU's limit (`benchmarks/train_efficiency.py`)\n\n"
            "Peak: the faster dense kernel of each precision, medians of "
            f"{args.repeats}: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in kernels.items()) + " "
            f"({machine()}). Training: `train_one_epoch` on OrganAMNIST 28 px, batch {BATCH}, AdamW, augmentation "
            f"{', '.join(augment)}, medians of {args.repeats} x {args.steps} steps. FLOPs of a forward and backward "
            "pass by `torch.utils.flop_counter` (convolutions and matmuls only, counted as direct convolutions). "
            "MKL's sgemm takes its AVX2 path on AMD CPUs while oneDNN uses AVX-512, hence the two kernels. bf16: the "
            "step under bfloat16 autocast (`precision=auto` on a CPU with native bfloat16, as this one), weights and "
            "optimiser in float32.\n\n" + "\n".join(table)
        ),
    )


if __name__ == "__main__":
    main()
