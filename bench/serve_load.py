"""Online inference under load, on loopback: terarec's predict route vs a bare FastAPI + torch endpoint.

terarec: the control plane (`terarec serve`, uvicorn) -> Ray Serve handle -> the InferenceModel replica
(`@serve.batch`) -> embedding server actors. Baseline: one uvicorn process with a FastAPI route that parses the
same request body and runs the same model in-process (the checkpoint's rows in a local store). Both score the
same checkpoint (DLRM, trained here for a few steps on synthetic data) and the same rows. For each batch size
(1, 256 rows per request) and concurrency (1, 8, 64 clients), the load runs for `--seconds` or `--max-requests`,
whichever ends first; figures are p50/p99 latency and rows/s. JSON goes to bench/results/serve_load.json, a table
to bench/results/serve_load.md.

    python bench/serve_load.py [--seconds 4] [--max-requests 4000]
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from results import RESULTS, device_name, record  # bench/results.py
from terarec.api.schemas import PredictRequest, PredictResponse  # module level: the bare route's annotations

CONCURRENCY = (1, 8, 64)
BATCHES = (1, 256)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(workdir: str, rows: int, steps: int) -> tuple[str, str]:
    """Synthetic data and a DLRM checkpoint (default sizes) trained in-process for `steps` steps."""
    import torch

    from terarec.actors.train_worker import TrainWorker
    from terarec.kernels.comm import LocalCommunicator
    from terarec.core.config import load_config
    from terarec.core.data.synth import write_synthetic

    data, checkpoint = os.path.join(workdir, "data"), os.path.join(workdir, "checkpoint")
    write_synthetic(data, rows=rows, seed=0, cardinality_scale=1e-3)
    config = load_config(tree={"data": data, "run_dir": workdir, "steps": steps, "batch_size": 1024, "log_every": steps})
    worker = TrainWorker(config, LocalCommunicator(), torch.device("cpu"))
    worker.train()
    os.makedirs(checkpoint)
    worker.save(checkpoint)
    return data, checkpoint


def request_bodies(data: str) -> dict[int, bytes]:
    """One JSON body per batch size, from the eval split (stored values: `transformed` is true)."""
    import pyarrow.parquet as pq

    from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS

    table = pq.read_table(sorted(glob.glob(os.path.join(data, "eval", "*.parquet")))[0]).slice(0, max(BATCHES))
    dense = np.stack([table[name].to_numpy() for name in DENSE_COLUMNS], axis=1).tolist()
    sparse = np.stack([table[name].to_numpy() for name in SPARSE_COLUMNS], axis=1).tolist()
    return {batch: json.dumps({"rows": [{"dense": d, "sparse": s} for d, s in zip(dense[:batch], sparse[:batch])],
                               "transformed": True}).encode() for batch in BATCHES}


def bare_server(port: int, checkpoint_dir: str) -> None:
    """The baseline: FastAPI + torch in one process, the same request schema and model, no Ray."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from terarec.actors.inference import model_from_checkpoint, score
    from terarec.core.checkpoints import open_checkpoint

    torch.set_num_threads(1)  # as a Serve replica with one CPU
    checkpoint = open_checkpoint(checkpoint_dir)
    model = model_from_checkpoint(checkpoint, checkpoint.load_rows())
    app = FastAPI()

    @app.post("/predict", response_model=PredictResponse)
    def predict(body: PredictRequest) -> PredictResponse:
        dense = torch.tensor([row.dense for row in body.rows], dtype=torch.float32)
        sparse = torch.tensor([row.sparse for row in body.rows], dtype=torch.int64)
        return PredictResponse(model="bare", scores=score(model, dense, sparse).tolist())

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def wait_up(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.3)
    raise RuntimeError(f"the server at {url} did not come up in {timeout} s")


async def load(url: str, body: bytes, headers: dict, concurrency: int, seconds: float, max_requests: int) -> dict:
    """`concurrency` clients send `body` back to back until the time or the request budget runs out."""
    latencies: list[float] = []
    errors, sent = 0, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120, headers=headers) as client:
        for _ in range(3):  # warm: connections, the model's first forward
            await client.post(url, content=body)
        deadline = time.perf_counter() + seconds

        async def client_loop():
            nonlocal errors, sent
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                started = time.perf_counter()
                response = await client.post(url, content=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if not latencies:
        raise RuntimeError(f"every request to {url} failed ({errors} errors)")
    batch = len(json.loads(body)["rows"])
    ms = np.array(latencies) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "rows_per_s": len(latencies) * batch / elapsed, "requests": len(latencies), "errors": errors}


def run_cells(name: str, url: str, bodies: dict[int, bytes], headers: dict, args) -> dict:
    figures = {}
    for batch in BATCHES:
        for concurrency in CONCURRENCY:
            cell = asyncio.run(load(url, bodies[batch], headers, concurrency, args.seconds, args.max_requests))
            figures[f"batch{batch}_c{concurrency}"] = cell
            print(f"{name:8s} batch {batch:3d} c {concurrency:2d}: p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms  "
                  f"{cell['rows_per_s']:9.0f} rows/s  ({cell['requests']} requests, {cell['errors']} errors)", flush=True)
    return figures


def markdown(figures: dict, settings: dict) -> str:
    lines = ["# Online inference under load (bench/serve_load.py)", "",
             f"{device_name()}, {settings['date']}; {settings['model']} checkpoint, {settings['seconds']} s or "
             f"{settings['max_requests']} requests per cell, loopback HTTP, JSON bodies; load generator, servers and "
             f"Ray share the {settings['cpus']} cores (load average {settings['load_average_1m']:.1f} at the end).", "",
             "terarec: control plane -> Ray Serve (@serve.batch, 1 replica of 1 CPU) -> 2 embedding servers. "
             "bare: FastAPI + torch in one process (same schema, same model, rows in a local store).", "",
             "| rows/request | clients | terarec p50 ms | terarec p99 ms | terarec rows/s | bare p50 ms | bare p99 ms | bare rows/s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for batch in BATCHES:
        for concurrency in CONCURRENCY:
            key = f"batch{batch}_c{concurrency}"
            ours, bare = figures["terarec"][key], figures["bare"][key]
            lines.append(f"| {batch} | {concurrency} | {ours['p50_ms']:.2f} | {ours['p99_ms']:.2f} | {ours['rows_per_s']:,.0f} "
                         f"| {bare['p50_ms']:.2f} | {bare['p99_ms']:.2f} | {bare['rows_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="load duration per cell")
    parser.add_argument("--max-requests", type=int, default=4000, help="request budget per cell")
    parser.add_argument("--rows", type=int, default=50_000, help="synthetic rows to train on")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return bare_server(int(args.bare_server[0]), args.bare_server[1])

    import ray

    workdir = tempfile.mkdtemp(prefix="serve-load-")
    data, checkpoint = make_checkpoint(workdir, args.rows, args.steps)
    bodies = request_bodies(data)
    figures: dict = {}

    port = free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port), checkpoint])
    try:
        wait_up(f"http://127.0.0.1:{port}/docs", bare)
        figures["bare"] = run_cells("bare", f"http://127.0.0.1:{port}/predict", bodies,
                                    {"Content-Type": "application/json"}, args)
    finally:
        bare.terminate()
        bare.wait()

    context = ray.init(num_cpus=4, include_dashboard=False)
    token, port = secrets.token_hex(16), free_port()
    env = os.environ | {"TERAREC_API_TOKEN": token, "TERAREC_DB_PATH": os.path.join(workdir, "jobs.db"),
                        "RAY_ADDRESS": context.address_info["address"]}
    api = subprocess.Popen([sys.executable, "-m", "terarec.platform.cli", "serve", "--port", str(port),
                            "--log-level", "warning"], env=env,
                           cwd=workdir)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz", api)
        deployed = httpx.post(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=300,
                              json={"name": "bench", "checkpoint": checkpoint, "replicas": 1, "servers": 2})
        deployed.raise_for_status()
        figures["terarec"] = run_cells("terarec", f"http://127.0.0.1:{port}/v1/models/bench/predict", bodies, headers, args)
        httpx.delete(f"http://127.0.0.1:{port}/v1/models/bench", headers=headers, timeout=120)
    finally:
        api.terminate()
        api.wait()
        ray.shutdown()

    settings = {"seconds": args.seconds, "max_requests": args.max_requests, "rows": args.rows, "steps": args.steps,
                "model": "dlrm (default sizes, embedding dim 16)", "batches": BATCHES, "concurrency": CONCURRENCY,
                "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}
    record("serve_load", figures, settings)
    with open(os.path.join(RESULTS, "serve_load.md"), "w") as stream:
        stream.write(markdown(figures, settings))
    print(markdown(figures, settings))


if __name__ == "__main__":
    main()
