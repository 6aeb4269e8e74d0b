"""Soak test on 127.0.0.1: the MedZoo service under constant load for minutes, watching errors and memory.

Builds the same throw-away stores as serve_load.py (a `cnn` trained briefly on real OrganAMNIST, registered and
deployed), starts `bentoml serve`, then keeps C keep-alive clients sending real test images for the whole
duration, in windows of W seconds. After each window it records requests, errors, wrong answers and the
server's memory (RSS of the process tree). The first window is the warm-up; the baseline is the RSS after it,
and the target is 0 errors and RSS growth under 10% from there to the end.

    python benchmarks/soak.py [--minutes 10] [--concurrency 64] [--window 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import real_data_dir, write_section
from serve_load import (
    ROOT,
    Target,
    champion_classes,
    classify_requests,
    deployed_stores,
    organ_test_images,
    run_load,
    tree_rss_mb,
)

GROWTH_TARGET = 0.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="length of the soak")
    parser.add_argument("--concurrency", type=int, default=64, help="keep-alive clients")
    parser.add_argument("--window", type=float, default=60, help="seconds between memory readings")
    parser.add_argument("--images", type=int, default=256, help="distinct real test images cycled through")
    args = parser.parse_args()

    data_dir = real_data_dir()
    with tempfile.TemporaryDirectory(prefix="medzoo-soak-") as tmp:
        workdir = Path(tmp)
        env = deployed_stores(workdir, data_dir)
        images = organ_test_images(data_dir, args.images)
        requests = classify_requests(images)
        expected = champion_classes(images, workdir)
        target = Target(
            "MedZoo (BentoML)",
            [sys.executable, "-m", "bentoml", "serve", "serving.service:MedZoo", "--host", "127.0.0.1"],
            "--port",
            "/classify",
            env,
            ROOT,
            requests.__getitem__,
            expected,
        )
        target.start()
        raw = target.raw_requests(len(requests))
        windows = []
        try:
            for index in range(max(2, round(args.minutes * 60 / args.window))):
                result = run_load(target, raw, args.concurrency, args.window)
                result["rss_mb"] = tree_rss_mb(target.process)
                windows.append(result)
                print(
                    f"window {index + 1}: {result['rps']:.0f} req/s, {result['errors']} errors, "
                    f"{result['wrong']} wrong, RSS {result['rss_mb']:.0f} MB",
                    flush=True,
                )
        finally:
            target.stop()
    write_section("soak", report(windows, args))


def report(windows: list[dict], args) -> str:
    baseline, end = windows[0]["rss_mb"], windows[-1]["rss_mb"]
    growth = end / baseline - 1
    errors = sum(w["errors"] for w in windows)
    wrong = sum(w["wrong"] for w in windows)
    requests = sum(w["requests"] for w in windows)
    lines = [
        "## Soak: constant load on the service (`benchmarks/soak.py`)",
        "",
        f"{len(windows)} windows of {args.window:.0f} s at {args.concurrency} keep-alive clients on 127.0.0.1 "
        "(a `cnn` on real OrganAMNIST test images; the clients share the 2 cores with the server). Baseline: the "
        "server's RSS after the first (warm-up) window.",
        "",
        "| window | requests/s | p50 ms | p99 ms | errors | wrong answers | server RSS (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, w in enumerate(windows, 1):
        lines.append(
            f"| {index} | {w['rps']:.0f} | {w['p50']:.1f} | {w['p99']:.1f} | {w['errors']} | {w['wrong']} | "
            f"{w['rss_mb']:.0f} |"
        )
    verdict = "met" if errors == 0 and growth < GROWTH_TARGET else "missed"
    lines += [
        "",
        f"{requests} requests, {errors} errors, {wrong} wrong answers; RSS {baseline:.0f} MB after warm-up, "
        f"{end:.0f} MB at the end ({growth:+.1%}; median req/s {np.median([w['rps'] for w in windows]):.0f}). "
        f"Target (0 errors, growth < {GROWTH_TARGET:.0%}): **{verdict}**.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
