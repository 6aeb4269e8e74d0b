"""Bounded HTTP load test on 127.0.0.1: this BentoML service vs `mlflow models serve`, same model.

Builds a throw-away MLflow store and BentoML home (a `cnn` trained briefly on real OrganAMNIST, registered as
champion and deployed), starts each server (cold start: process start to the first correct answer), then
runs rounds in which every server in turn gets C concurrent clients for T seconds with real test images:
requests/s, latency percentiles, errors, server CPU time per request (medians over rounds) and server memory
(RSS of the process tree) before the first round and after the last. Clients send what each
server is built for: PNG files to MedZoo (decoded and preprocessed server-side), the preprocessed float
tensor as JSON to MLflow.

The load generator shares the machine with the servers, so it is built to cost little: every request is
encoded once up front, and each client is a keep-alive HTTP/1.1 connection that writes those bytes and reads
the answer (about 0.05 ms of client CPU per request). Clients connect 20 ms apart and are measured once all
are connected, as a load tester's ramp-up does: connections opened in one burst all land on whichever
server worker accepts first, which measures the accept race rather than the server.

    python benchmarks/serve_load.py [--concurrency 16 64] [--seconds 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from common import ROOT, real_data_dir, write_section
from PIL import Image

from tests.helpers.net import free_port


def server_cpu_seconds(process: psutil.Process) -> float:
    procs = [process, *process.children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())


def tree_rss_mb(process: psutil.Process) -> float:
    procs = [process, *process.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def prepare(workdir: Path, env: dict) -> None:
    """Train, register and deploy a small real model into ``workdir``'s stores (subprocesses, real code)."""
    steps = [
        [
            "-m",
            "training.cli",
            "train",
            "--model",
            "cnn",
            "--dataset",
            "organamnist",
            "--epochs",
            "2",
            "--max-train-samples",
            "8000",
            "--no-progress",
        ],
        ["-m", "training.cli", "register", "--dataset", "organamnist"],
        ["-m", "training.cli", "deploy", "--datasets", "organamnist"],
    ]
    for step in steps:
        subprocess.run([sys.executable, *step], cwd=workdir, env=env, check=True, capture_output=True)


BOUNDARY = "medzoo-load-test-boundary"


def deployed_stores(workdir: Path, data_dir: Path) -> dict:
    """Throw-away MLflow and BentoML stores in ``workdir`` with a deployed champion; this process uses them too.
    Returns the environment for the servers."""
    env = {
        **os.environ,
        "MEDZOO_DATA_DIR": str(data_dir),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "BENTOML_HOME": str(workdir / "bentoml"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    print("training, registering and deploying a cnn on OrganAMNIST ...", flush=True)
    prepare(workdir, env)
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "BENTOML_HOME")})
    return env


def organ_test_images(data_dir: Path, count: int):
    from training.core.data import load_dataset  # (after the env points at the temp stores)

    return load_dataset("organamnist", data_dir).test.images[:count]


def classify_requests(images) -> list[dict]:
    """One multipart /classify request per image, encoded once."""
    multipart = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return [{"content": multipart_body(png(img[0].numpy()), "organ"), "headers": multipart} for img in images]


def champion_classes(images, workdir: Path) -> np.ndarray:
    """What the registered champion answers offline (onnxruntime): the expected class of every image."""
    import mlflow
    import onnxruntime as ort

    local = mlflow.artifacts.download_artifacts("models:/medzoo-organamnist@champion", dst_path=str(workdir / "m"))
    session = ort.InferenceSession(f"{local}/model.onnx")
    return session.run(None, {session.get_inputs()[0].name: (images.float() / 255).numpy()})[0].argmax(1)


def multipart_body(image_png: bytes, task: str) -> bytes:
    """Encoded once per image, so the load generator spends its CPU on sending, not on encoding."""
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image_png
        + (
            f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="task"\r\n\r\n{task}\r\n--{BOUNDARY}--\r\n'
        ).encode()
    )


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


class Target:
    """A server command (its port flag appended at start) and the route its requests go to."""

    def __init__(self, name, command, port_flag, route, env, cwd, request_for, expected):
        self.name, self.command, self.port_flag, self.env, self.cwd = name, command, port_flag, env, cwd
        self.request_for, self.expected = request_for, expected  # index -> httpx kwargs; index -> class
        self.port, self.route = free_port(), route
        self.url = f"http://127.0.0.1:{self.port}{route}"

    def start(self) -> float:
        started = time.perf_counter()
        self.process = psutil.Popen(
            [*self.command, self.port_flag, str(self.port)],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = started + 180
        while time.perf_counter() < deadline:
            try:
                response = httpx.post(self.url, timeout=5, **self.request_for(0))
                if response.status_code == 200 and self.predicted(response) == self.expected[0]:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not answer correctly within 180 s")

    def raw_requests(self, count: int) -> list[bytes]:
        """Whole HTTP/1.1 requests (head and body), encoded once."""
        raw = []
        for index in range(count):
            request = self.request_for(index)
            head = [f"POST {self.route} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
            head += [f"{name}: {value}" for name, value in request["headers"].items()]
            head.append(f"Content-Length: {len(request['content'])}")
            raw.append(("\r\n".join(head) + "\r\n\r\n").encode() + request["content"])
        return raw

    def predicted(self, response) -> int:
        return self.predicted_from(response.json())

    def predicted_from(self, body: dict) -> int:
        if "class_index" in body:
            return body["class_index"]
        return int(np.argmax(np.asarray(body["predictions"]["logits"])[0]))

    def stop(self):
        for child in self.process.children(recursive=True):
            child.terminate()
        self.process.terminate()
        self.process.wait(30)


def median_result(results: list[dict]) -> dict:
    """Medians over rounds; errors and wrong answers are summed."""
    merged = {key: float(np.median([r[key] for r in results])) for key in ("rps", "cpu_ms", "p50", "p95", "p99")}
    merged.update({key: sum(r[key] for r in results) for key in ("requests", "errors", "wrong")})
    return merged


def mlflow_target(name, extra_args, env, workdir, requests, expected) -> Target:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        "models:/medzoo-organamnist@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        *extra_args,
    ]
    return Target(name, command, "-p", "/invocations", env, workdir, requests.__getitem__, expected)


RAMP_UP_S = 0.02  # between client connections


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, await reader.readexactly(int(value))
    raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")


async def load(target: Target, requests: list[bytes], concurrency: int, seconds: float) -> dict:
    """C keep-alive clients, each sending request after request; only the window after the ramp-up counts."""
    latencies, errors, wrong = [], 0, 0
    clock = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds
    measured_from = clock() + RAMP_UP_S * concurrency + 0.5
    deadline = measured_from + seconds

    async def client(offset: int):
        nonlocal errors, wrong
        await asyncio.sleep(RAMP_UP_S * offset)
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        i = offset
        try:
            while (started := clock()) < deadline:
                index = i % len(requests)
                i += concurrency
                writer.write(requests[index])
                try:
                    status, body = await asyncio.wait_for(read_response(reader), 30)
                except (OSError, RuntimeError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
                    continue
                if started < measured_from:
                    continue
                latencies.append(clock() - started)
                if status != 200:
                    errors += 1
                elif target.predicted_from(json.loads(body)) != target.expected[index]:
                    wrong += 1
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(client(k)) for k in range(concurrency)]
    await asyncio.sleep(measured_from - clock())
    cpu_before = server_cpu_seconds(target.process)
    await asyncio.gather(*tasks)
    elapsed = clock() - measured_from
    server_cpu = server_cpu_seconds(target.process) - cpu_before
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "cpu_ms": 1000 * server_cpu / max(len(latencies), 1),
        "p50": np.percentile(ms, 50),
        "p95": np.percentile(ms, 95),
        "p99": np.percentile(ms, 99),
        "errors": errors,
        "wrong": wrong,
    }


def run_load(target: Target, requests: list[bytes], concurrency: int, seconds: float) -> dict:
    try:
        import uvloop  # the client's own overhead drops by about a third

        return uvloop.run(load(target, requests, concurrency, seconds))
    except ImportError:
        return asyncio.run(load(target, requests, concurrency, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64], help="client counts to compare at")
    parser.add_argument("--seconds", type=float, default=15, help="length of one round of load per server")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the table reports medians over them")
    parser.add_argument("--images", type=int, default=256, help="distinct real test images cycled through")
    args = parser.parse_args()

    data_dir = real_data_dir()
    with tempfile.TemporaryDirectory(prefix="medzoo-load-") as tmp:
        workdir = Path(tmp)
        env = deployed_stores(workdir, data_dir)
        images = organ_test_images(data_dir, args.images)
        medzoo_requests = classify_requests(images)
        mlflow_requests = [
            {
                "content": json.dumps({"inputs": (img.float() / 255).numpy()[None].tolist()}).encode(),
                "headers": {"Content-Type": "application/json"},
            }
            for img in images
        ]
        expected = champion_classes(images, workdir)

        targets = [
            Target(
                "MedZoo (BentoML)",
                [sys.executable, "-m", "bentoml", "serve", "serving.service:MedZoo", "--host", "127.0.0.1"],
                "--port",
                "/classify",
                env,
                ROOT,
                medzoo_requests.__getitem__,
                expected,
            ),
            mlflow_target("mlflow models serve", [], env, workdir, mlflow_requests, expected),
            mlflow_target(
                f"mlflow models serve -w {os.cpu_count()}",
                ["-w", str(os.cpu_count())],
                env,
                workdir,
                mlflow_requests,
                expected,
            ),
        ]
        cold, before = {}, {}
        rounds = {(t.name, c): [] for t in targets for c in args.concurrency}
        for target in targets:  # cold starts one at a time, on an otherwise idle machine
            print(f"starting {target.name} ...", flush=True)
            cold[target.name] = target.start()
            before[target.name] = tree_rss_mb(target.process)
        raw = {target.name: target.raw_requests(len(images)) for target in targets}
        for round_number in range(args.rounds):  # alternate the servers, so drifting load hits all alike
            for concurrency in args.concurrency:
                for target in targets:
                    result = run_load(target, raw[target.name], concurrency, args.seconds)
                    rounds[target.name, concurrency].append(result)
                    print(
                        f"round {round_number + 1}, {concurrency} clients, {target.name}: {result['rps']:.0f} req/s, "
                        f"{result['cpu_ms']:.2f} ms server CPU/request, p50 {result['p50']:.1f} ms, "
                        f"p99 {result['p99']:.1f} ms, errors {result['errors']}, wrong {result['wrong']}",
                        flush=True,
                    )
        after = {}
        for target in targets:
            after[target.name] = tree_rss_mb(target.process)
            target.stop()

    sections = []
    for concurrency in args.concurrency:
        merged = {t.name: median_result(rounds[t.name, concurrency]) for t in targets}
        ours, mlflow_default, mlflow_same = (merged[t.name] for t in targets)
        table = [
            "| server | req/s | p50 (ms) | p95 (ms) | p99 (ms) | server CPU per request (ms) | requests | errors | "
            "wrong answers |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for target in targets:
            r = merged[target.name]
            table.append(
                f"| {target.name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} "
                f"| {r['cpu_ms']:.2f} | {r['requests']} | {r['errors']} | {r['wrong']} |"
            )
        sections.append(
            f"### {concurrency} concurrent clients\n\n"
            + "\n".join(table)
            + f"\n\nMedZoo / MLflow requests/s: **{ours['rps'] / mlflow_default['rps']:.1f}x** (MLflow default), "
            f"**{ours['rps'] / mlflow_same['rps']:.1f}x** (same worker count); "
            f"server CPU per request, MLflow / MedZoo: **{mlflow_default['cpu_ms'] / ours['cpu_ms']:.1f}x**."
        )
    startup = ["| server | cold start (s) | RSS before / after the rounds (MB) |", "|---|---:|---:|"]
    startup += [f"| {t.name} | {cold[t.name]:.1f} | {before[t.name]:.0f} / {after[t.name]:.0f} |" for t in targets]
    write_section(
        "serve_load",
        (
            f"## Serving load test, OrganAMNIST cnn, {args.rounds} rounds of {args.seconds:.0f} s per server and "
            "client count\n\n"
            "Medians over the rounds (requests, errors and wrong answers summed); in each round the servers take "
            "the load one after the other. "
            f"The servers on 127.0.0.1: MedZoo with its default of one worker per core "
            f"({os.cpu_count()}), MLflow with its default (1) and with as many workers as MedZoo. The load generator "
            "(keep-alive HTTP/1.1 clients in one asyncio process, connecting 20 ms apart) on the same cores. "
            "Real OrganAMNIST test images: PNG uploads to MedZoo, the preprocessed float tensor as JSON to "
            "MLflow's scoring server. Cold start: process start to the first correct answer. Server CPU counts "
            "every process of the server.\nReproduce: `python benchmarks/serve_load.py`. Target: >= 5x MLflow's "
            "req/s at the same concurrency, lower p99, zero errors.\n\n"
            + "\n\n".join(sections)
            + "\n\n"
            + "\n".join(startup)
        ),
    )


if __name__ == "__main__":
    main()
