"""What activation maps would cost the plain prediction path: a second graph (what ships) vs a second output.

    python benchmarks/cam_cost.py [--repeats 5] [--calls 300]

`quick`'s network shape (resnet9, width 16, five test-time views, a temperature) on OrganAMNIST-sized input
(1 x 28 x 28), random weights (cost does not depend on them). onnxruntime with one thread, as the service runs it:
the served graph (`logits` only); the explanation graph asked for `logits` only (what `/classify` would run if the
maps were a second output of the served graph); and the explanation graph asked for both outputs (`/explain`).
Batch 1 (one request) and batch 16 (an adaptive batch under load); median latency per call over `--repeats`
rounds of `--calls` calls, and the ratio to the served graph in the same round. Writes RESULTS.md's "cam-cost".
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
from training.export.onnx import export_explanation, export_onnx

VIEWS = ("identity", "hflip", "shift_up", "shift_down", "shift_left")


def session(proto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def per_call(run, calls: int) -> float:
    run()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    network = zoo.NormalizedClassifier(
        zoo.create_model("resnet9", in_chans=1, num_classes=11, input_size=28, width=16), (0.5,), (0.25,)
    ).eval()
    served = zoo.TemperatureScaled(zoo.TTAClassifier(network, VIEWS), 0.4).eval()
    probe = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    plain = session(export_onnx(served, 28, 1, {}))
    explain = session(export_explanation(served, network, 28, 1, probe))
    ways = {
        "served graph, logits (what /classify runs)": lambda x: plain.run(["logits"], {"pixels": x}),
        "explanation graph, logits only (a second output)": lambda x: explain.run(["logits"], {"pixels": x}),
        "explanation graph, logits and maps (what /explain runs)": lambda x: explain.run(None, {"pixels": x}),
    }
    rows = []
    for batch in (1, 16):
        x = np.random.default_rng(1).random((batch, 1, 28, 28), dtype=np.float32)
        times = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, run in ways.items():
                times[name].append(per_call(lambda run=run, x=x: run(x), args.calls))
        base = statistics.median(times[next(iter(ways))])
        for name in ways:
            median = statistics.median(times[name])
            rows.append(f"| {batch} | {name} | {median:.3f} | {median / base:.2f}x |")
        print("\n".join(rows[-len(ways) :]), flush=True)
    write_section(
        "cam-cost",
        f"""## What activation maps cost the plain prediction path

`python benchmarks/cam_cost.py --repeats {args.repeats} --calls {args.calls}`: `quick`'s network shape (resnet9
width 16, 5 test-time views, a temperature) at 28 px, onnxruntime with 1 thread as the service runs it; median
milliseconds per call over {args.repeats} rounds, ratio to the served graph in the same rounds. The maps ship as a
second graph (`explain.onnx`), so `/classify` keeps the first row's cost; the second row is what it would pay if
they were a second output of the served graph (onnxruntime runs only the nodes a requested output needs, if it
does: this row says).

| batch | graph and outputs | ms per call | vs served graph |
|---:|---|---:|---:|
{chr(10).join(rows)}
""",
    )


if __name__ == "__main__":
    main()
