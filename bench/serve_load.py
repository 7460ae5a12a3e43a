"""Online inference under load, on loopback: terarec's predict route vs a bare FastAPI + torch endpoint.

terarec: the control plane (`terarec serve`, uvicorn) -> Ray Serve handle -> the InferenceModel replica
(`@serve.batch`, recent rows cached) -> embedding server actors. Baseline: one uvicorn process with a FastAPI
route that parses the same request body and runs the same model in-process (the checkpoint's rows in a local
store). Both score the same checkpoint (DLRM, trained here for a few steps on synthetic data) and the same eval
rows (each client walks through distinct bodies); each cell runs the bare endpoint, terarec and terarec with Arrow
IPC bodies back to back, so that their figures see the same load on a shared machine (Arrow bodies: the Criteo
columns; the baseline keeps JSON, as a plain FastAPI endpoint would). For each batch size (1, 256 rows per request)
and concurrency (1, 8, 64 clients), the load runs for `--seconds` or `--max-requests`, whichever ends first;
figures are p50/p99 latency and rows/s. Two more terarec deployments run the 1-client cells: without the
replica's row cache (every request asks the servers), and with the servers on `cached_host` whose cache holds
a quarter of the table (its hit rate is read from the servers). `hops` times the pieces of one single-row
request: reading its body, the local forward, one embedding-server call, the Serve handle call. JSON goes to
bench/results/serve_load.json, a table to bench/results/serve_load.md.

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
from terarec.api.predict_bodies import ARROW, read_arrow, read_json
from terarec.api.schemas import PredictRequest, PredictResponse  # module level: the bare route's annotations

CONCURRENCY = (1, 8, 64)
BATCHES = (1, 256)
BODIES_PER_BATCH = {1: 2048, 256: 16}  # distinct bodies the clients walk through


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


def eval_rows(data: str) -> tuple[np.ndarray, np.ndarray]:
    """dense [n, 13] (stored, transformed) and sparse [n, 26] of the eval split."""
    import pyarrow.parquet as pq

    from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS

    table = pq.read_table(sorted(glob.glob(os.path.join(data, "eval", "*.parquet"))))
    dense = np.stack([table[name].to_numpy() for name in DENSE_COLUMNS], axis=1).astype(np.float32)
    sparse = np.stack([table[name].to_numpy() for name in SPARSE_COLUMNS], axis=1).astype(np.int64)
    return dense, sparse


def request_bodies(dense: np.ndarray, sparse: np.ndarray, arrow: bool = False) -> dict[int, list[bytes]]:
    """Distinct bodies per batch size, cycling through the eval rows (stored values: `transformed`): JSON, or Arrow
    IPC streams of the I1..I13, C1..C26 columns."""
    import pyarrow as pa

    from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS

    def arrow_body(rows: np.ndarray) -> bytes:
        table = pa.table({name: dense[rows, i] for i, name in enumerate(DENSE_COLUMNS)}
                         | {name: sparse[rows, i] for i, name in enumerate(SPARSE_COLUMNS)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    bodies = {}
    for batch, count in BODIES_PER_BATCH.items():
        picks = np.arange(batch * count).reshape(count, batch) % len(dense)
        bodies[batch] = [arrow_body(rows) if arrow else
                         json.dumps({"rows": [{"dense": dense[i].tolist(), "sparse": sparse[i].tolist()} for i in rows],
                                     "transformed": True}).encode() for rows in picks]
    return bodies


def bare_server(port: int, checkpoint_dir: str) -> None:
    """The baseline: FastAPI + torch in one process, the same request schema and model, no Ray; rows and model on
    the GPU when there is one."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from terarec.actors.embedding_server import serving_store
    from terarec.actors.inference import model_from_checkpoint, score
    from terarec.core.checkpoints import open_checkpoint
    from terarec.core.config import StoreConfig

    torch.set_num_threads(1)  # as a Serve replica with one CPU
    checkpoint = open_checkpoint(checkpoint_dir)
    rows = checkpoint.load_rows(store=serving_store(checkpoint, StoreConfig(), rank=0))
    model = model_from_checkpoint(checkpoint, rows).to(rows.device)
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


async def load(url: str, bodies: list[bytes], batch: int, headers: dict, concurrency: int, seconds: float,
               max_requests: int) -> dict:
    """`concurrency` clients send the bodies in turn, back to back, until the time or the request budget runs out."""
    latencies: list[float] = []
    errors, sent = 0, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120, headers=headers) as client:
        for body in bodies[:3]:  # warm: connections, the model's first forward
            await client.post(url, content=body)
        deadline = time.perf_counter() + seconds

        async def client_loop():
            nonlocal errors, sent
            while time.perf_counter() < deadline and sent < max_requests:
                body = bodies[sent % len(bodies)]
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
    ms = np.array(latencies) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "rows_per_s": len(latencies) * batch / elapsed, "requests": len(latencies), "errors": errors}


def run_cells(targets: dict[str, tuple[str, dict[int, list[bytes]], dict]], args, concurrencies=CONCURRENCY) -> dict:
    """Every cell (rows per request, clients) for each target (name: url, bodies, headers) in turn: the targets a
    cell compares run within seconds of each other (on a shared machine the load drifts over minutes)."""
    figures: dict = {name: {} for name in targets}
    for batch in BATCHES:
        for concurrency in concurrencies:
            for name, (url, bodies, headers) in targets.items():
                cell = asyncio.run(load(url, bodies[batch], batch, headers, concurrency, args.seconds, args.max_requests))
                figures[name][f"batch{batch}_c{concurrency}"] = cell
                print(f"{name:13s} batch {batch:3d} c {concurrency:2d}: p50 {cell['p50_ms']:7.2f} ms  p99 "
                      f"{cell['p99_ms']:7.2f} ms  {cell['rows_per_s']:9.0f} rows/s  ({cell['requests']} requests, "
                      f"{cell['errors']} errors)", flush=True)
    return figures


def hops(model: str, checkpoint_dir: str, dense: np.ndarray, sparse: np.ndarray, bodies: dict[int, list[bytes]],
         arrow_bodies: dict[int, list[bytes]], repeats: int = 200) -> dict:
    """Median ms of the pieces of a request, timed from this driver (servers of `model`): reading the JSON body (1 and
    256 rows) and the Arrow one (256 rows) into arrays as the control plane does, the forward in-process, embedding-server calls, the Serve handle call."""
    import ray
    import torch
    from ray import serve

    from terarec.actors.embedding_server import server_handles, server_names
    from terarec.actors.inference import model_from_checkpoint, score
    from terarec.core.checkpoints import open_checkpoint
    from terarec.store import feature_keys

    def median_ms(call) -> float:
        call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return float(np.median(times) * 1e3)

    checkpoint = open_checkpoint(checkpoint_dir)
    local = model_from_checkpoint(checkpoint, checkpoint.load_rows())
    row_dense, row_sparse = dense[:1], sparse[:1]
    keys = torch.unique(feature_keys(torch.from_numpy(row_sparse)))
    servers = server_handles(server_names(model, checkpoint, 2))
    handle = serve.get_app_handle(model)
    return {"json_body_1_row": median_ms(lambda: read_json(bodies[1][0])),
            "json_body_256_rows": median_ms(lambda: read_json(bodies[256][0])),
            "arrow_body_256_rows": median_ms(lambda: read_arrow(arrow_bodies[256][0])),
            "forward_in_process": median_ms(lambda: score(local, torch.from_numpy(row_dense), torch.from_numpy(row_sparse))),
            "one_server_call": median_ms(lambda: ray.get(servers[0].lookup.remote(keys))),
            "both_servers_in_flight": median_ms(lambda: ray.get([server.lookup.remote(keys) for server in servers])),
            "serve_handle_predict": median_ms(lambda: handle.predict.remote((row_dense, row_sparse)).result())}


def markdown(figures: dict, settings: dict) -> str:
    lines = ["# Online inference under load (bench/serve_load.py)", "",
             f"{device_name()}, {settings['date']}; {settings['model']} checkpoint, {settings['seconds']} s or "
             f"{settings['max_requests']} requests per cell, loopback HTTP, JSON bodies (and Arrow ones to terarec); load generator, servers and "
             f"Ray share the {settings['cpus']} cores (load average {settings['load_average_1m']:.1f} at the end).", "",
             "terarec: control plane -> Ray Serve (@serve.batch, 1 replica of 1 CPU, recent rows cached) -> 2 embedding "
             "servers. bare: FastAPI + torch in one process (same schema as a declared JSON body, same model, rows in a local "
             "store). terarec Arrow: the same deployment, Arrow IPC bodies of the Criteo columns, Arrow replies.", "",
             "| rows/request | clients | terarec p50 ms | terarec p99 ms | terarec rows/s | bare p50 ms | bare p99 ms | "
             "bare rows/s | terarec Arrow p50 ms | Arrow p99 ms | Arrow rows/s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for batch in BATCHES:
        for concurrency in CONCURRENCY:
            key = f"batch{batch}_c{concurrency}"
            cells = [figures[name][key] for name in ("terarec", "bare", "terarec_arrow")]
            lines.append(f"| {batch} | {concurrency} | " + " | ".join(
                f"{cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} | {cell['rows_per_s']:,.0f}" for cell in cells) + " |")
    tiered = figures["tiered_servers"]
    lines += ["", "One client, three terarec deployments: the replica's row cache on (above), off (every request asks the "
              f"servers), and off with the servers on cached_host whose caches hold {tiered['cache_rows']:,.0f} of the "
              f"table's {tiered['table_rows']:,.0f} rows (hit rate {tiered['hit_rate']:.1%} over the run).", "",
              "| rows/request | cached p50 / p99 ms | no replica cache p50 / p99 ms | tiered servers p50 / p99 ms |",
              "| ---: | ---: | ---: | ---: |"]
    for batch in BATCHES:
        key = f"batch{batch}_c1"
        cells = [figures[name][key] for name in ("terarec", "terarec_no_recent", "terarec_tiered")]
        lines.append(f"| {batch} | " + " | ".join(f"{cell['p50_ms']:.2f} / {cell['p99_ms']:.2f}" for cell in cells) + " |")
    lines += ["", "Pieces of one single-row request (median ms, timed from a driver): "
              + ", ".join(f"{name.replace('_', ' ')} {ms:.2f}" for name, ms in figures["hops"].items()) + "."]
    return "\n".join(lines) + "\n"


def deploy(base: str, headers: dict, name: str, checkpoint: str, **fields) -> None:
    response = httpx.post(f"{base}/v1/models", headers=headers, timeout=300,
                          json={"name": name, "checkpoint": checkpoint, "replicas": 1, "servers": 2, **fields})
    if response.status_code != 200:
        raise RuntimeError(f"deploying {name} failed: {response.status_code} {response.text[:500]}")


def tiered_servers(name: str, checkpoint_dir: str) -> dict:
    """The tiered servers' cache: hit rate over the run, rows held, rows the caches hold."""
    import ray

    from terarec.actors.embedding_server import server_handles, server_names
    from terarec.core.checkpoints import open_checkpoint

    servers = server_handles(server_names(name, open_checkpoint(checkpoint_dir), 2))
    metrics = ray.get([server.metrics.remote() for server in servers])
    hits, looked = (sum(m["cache_hits"] for m in metrics), sum(m["cache_hits"] + m["cache_misses"] for m in metrics))
    return {"hit_rate": hits / max(1.0, looked), "table_rows": sum(m["rows"] for m in metrics),
            "cache_rows": sum(m["cache_capacity_rows"] for m in metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="load duration per cell")
    parser.add_argument("--max-requests", type=int, default=4000, help="request budget per cell")
    parser.add_argument("--rows", type=int, default=50_000, help="synthetic rows to train on")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cpus", type=int, default=4, help="CPUs of the local Ray")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per replica and per server (bare: on the GPU)")
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return bare_server(int(args.bare_server[0]), args.bare_server[1])
    from terarec.actors.serve_env import use_serve_env

    use_serve_env()  # this driver's handle (`hops`) as the control plane's
    import ray

    workdir = tempfile.mkdtemp(prefix="serve-load-")
    data, checkpoint = make_checkpoint(workdir, args.rows, args.steps)
    dense, sparse = eval_rows(data)
    bodies, arrow_bodies = request_bodies(dense, sparse), request_bodies(dense, sparse, arrow=True)
    figures: dict = {}

    bare_port = free_port()
    bare_env = os.environ | ({} if args.gpus else {"CUDA_VISIBLE_DEVICES": ""})  # the same device as terarec
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port), checkpoint], env=bare_env)
    context = ray.init(num_cpus=args.cpus, include_dashboard=False, namespace="terarec")
    token, port = secrets.token_hex(16), free_port()
    env = os.environ | {"TERAREC_API_TOKEN": token, "TERAREC_DB_PATH": os.path.join(workdir, "jobs.db"),
                        "RAY_ADDRESS": context.address_info["address"]}
    api = subprocess.Popen([sys.executable, "-m", "terarec.platform.cli", "serve", "--port", str(port),
                            "--log-level", "warning"], env=env, cwd=workdir)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    base = f"http://127.0.0.1:{port}"
    table_bytes = sum(os.path.getsize(path) for path in glob.glob(os.path.join(checkpoint, "shard-*")))
    try:
        wait_up(f"http://127.0.0.1:{bare_port}/docs", bare)
        wait_up(f"{base}/healthz", api)
        on_gpu = {"server_gpus": args.gpus / 4, "serving": {"gpus": args.gpus / 2, "max_batch_rows": 65536}} if args.gpus else {}
        deploy(base, headers, "bench", checkpoint, **on_gpu)
        figures |= run_cells({"bare": (f"http://127.0.0.1:{bare_port}/predict", bodies, {"Content-Type": "application/json"}),
                              "terarec": (f"{base}/v1/models/bench/predict", bodies, headers),
                              "terarec_arrow": (f"{base}/v1/models/bench/predict?transformed=true", arrow_bodies,
                                                headers | {"Content-Type": ARROW})}, args)
        figures["hops"] = hops("bench", checkpoint, dense, sparse, bodies, arrow_bodies)
        deploy(base, headers, "direct", checkpoint, serving={"recent_rows": 0})
        store = {"kind": "cached_host", "cache_bytes": table_bytes / 2 / 4}  # per server: a quarter of its half
        deploy(base, headers, "tiered", checkpoint, serving={"recent_rows": 0}, store=store)
        figures |= run_cells({"terarec_no_recent": (f"{base}/v1/models/direct/predict", bodies, headers),
                              "terarec_tiered": (f"{base}/v1/models/tiered/predict", bodies, headers)}, args,
                             concurrencies=(1,))
        figures["tiered_servers"] = tiered_servers("tiered", checkpoint)
        for name in ("bench", "direct", "tiered"):
            httpx.delete(f"{base}/v1/models/{name}", headers=headers, timeout=120)
    finally:
        bare.terminate()
        bare.wait()
        api.terminate()
        api.wait()
        ray.shutdown()

    settings = {"seconds": args.seconds, "max_requests": args.max_requests, "rows": args.rows, "steps": args.steps,
                "model": "dlrm (default sizes, embedding dim 16)", "batches": BATCHES, "concurrency": CONCURRENCY,
                "table_bytes": table_bytes, "ray_cpus": args.cpus, "gpus": args.gpus, "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
                "date": time.strftime("%Y-%m-%d")}
    record("serve_load", figures, settings)
    with open(os.path.join(RESULTS, "serve_load.md"), "w") as stream:
        stream.write(markdown(figures, settings))
    print(markdown(figures, settings))


if __name__ == "__main__":
    main()
