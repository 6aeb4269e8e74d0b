"""Inference latency: onnxruntime vs eager PyTorch, same model and inputs, measured in the same run.

For each model (freshly initialised at 28 px, OrganAMNIST shape: 1 channel, 11 classes) it exports the
MedZoo ONNX graph (normalisation inside), then times batch-1 latency (p50, p99 over many single calls) and
batch-64 throughput for both runtimes, alternating, on real OrganAMNIST validation images when available.

    python benchmarks/onnx_latency.py [--calls 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from common import write_section

import zoo
from training.export.onnx import export_onnx


def images(n: int) -> np.ndarray:
    try:
        from benchmarks.common import real_data_dir
        from training.core.data import load_dataset

        val = load_dataset("organamnist", real_data_dir()).val
        return (val.images[:n].float() / 255).numpy()
    except SystemExit:
        return np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)


def latencies(predict, batches: list[np.ndarray]) -> list[float]:
    out = []
    for batch in batches:
        started = time.perf_counter()
        predict(batch)
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="batch-1 calls per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet18", "mobilenetv2"])
    args = parser.parse_args()

    data = images(max(args.calls, 64))
    singles = [data[i : i + 1] for i in range(args.calls)]
    batch64 = data[:64]
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = zoo.NormalizedClassifier(zoo.create_model(name, in_chans=1, num_classes=11), (0.47,), (0.30,)).eval()
        proto = export_onnx(model, 28, 1, {"dataset": "organamnist"})
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run_onnx(x, session=session, input_name=input_name):
            return session.run(None, {input_name: x})[0]

        def run_torch(x, model=model):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        for fn in (run_onnx, run_torch):  # warm-up
            for x in singles[:20]:
                fn(x)
        stats = {"onnx": {"b1": [], "b64": []}, "torch": {"b1": [], "b64": []}}
        for _ in range(args.repeats):
            for label, fn in (("torch", run_torch), ("onnx", run_onnx)):
                stats[label]["b1"] += latencies(fn, singles)
                stats[label]["b64"] += latencies(fn, [batch64] * 10)
        summary = {}
        for label in ("torch", "onnx"):
            b1 = np.array(stats[label]["b1"]) * 1000
            summary[label] = (np.percentile(b1, 50), np.percentile(b1, 99), 64 / statistics.median(stats[label]["b64"]))
        speedup = summary["torch"][0] / summary["onnx"][0]
        rows.append((name, *summary["torch"], *summary["onnx"], speedup))
        print(
            f"{name:12s} torch p50 {summary['torch'][0]:.2f} ms  onnx p50 {summary['onnx'][0]:.2f} ms  "
            f"x{speedup:.1f} at batch 1",
            flush=True,
        )

    table = [
        "| model | torch p50 (ms) | torch p99 (ms) | torch b64 (img/s) | onnxruntime p50 (ms) | "
        "onnxruntime p99 (ms) | onnxruntime b64 (img/s) | batch-1 speed-up (p50) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table += [
        f"| {n} | {a:.2f} | {b:.2f} | {c:.0f} | {d:.2f} | {e:.2f} | {f:.0f} | {x:.1f}x |"
        for n, a, b, c, d, e, f, x in rows
    ]
    write_section(
        "onnx_latency",
        (
            "## Inference: onnxruntime vs eager PyTorch, 28 px, 1 channel, 11 classes\n\n"
            f"Batch-1 latency percentiles over {args.repeats} x {args.calls} calls on real OrganAMNIST validation "
            "images; batch-64 throughput as the median of 10 x repeats calls. Both in one process, alternating; "
            "PyTorch under `torch.inference_mode()`.\n"
            "Reproduce: `python benchmarks/onnx_latency.py`. Target: onnxruntime >= 2x eager PyTorch at batch 1.\n\n"
            + "\n".join(table)
        ),
    )


if __name__ == "__main__":
    main()
