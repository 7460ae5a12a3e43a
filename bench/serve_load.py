"""Online inference under load, on loopback: terarec's predict route vs a bare FastAPI + torch endpoint.

terarec: the InferenceModel replicas' own ingress (`serving.direct_ingress`: the control plane's token check and
body readers in the replica; `@serve.batch`, recent rows cached) -> embedding server actors; the clients spread over
the endpoints GET /v1/models/NAME lists. `terarec_control_plane`: the same deployment through the control plane
(`terarec serve`, uvicorn) and a Ray Serve handle call. Baseline: one uvicorn process with a FastAPI route that
parses the same request body and runs the same model in-process (the checkpoint's rows in a local store). All score
the same checkpoint (DLRM, trained here for a few steps on synthetic data) and the same eval rows (each client walks
through distinct bodies); each cell runs bare, terarec, terarec with Arrow IPC bodies and terarec through the control
plane back to back, so that their figures see the same load on a shared machine (Arrow bodies: the Criteo columns;
the baseline keeps JSON, as a plain FastAPI endpoint would). For each batch size (1, 256 rows per request) and
concurrency (1, 8, 64 clients), the load runs for `--seconds` or `--max-requests`, whichever ends first; figures are
p50/p99 latency and rows/s. Two more terarec deployments run the 1-client cells: without the replica's row cache
(every request asks the servers), and with the servers on `cached_host` whose cache holds a quarter of the table
(its hit rate is read from the servers). `hops` times the pieces of one single-row request: reading its body, the
local forward, one embedding-server call, the Serve handle call.

Sizes follow the machine: Ray gets os.cpu_count() CPUs, terarec one replica per 4 cores (at most 4), and with a GPU
the replicas, servers and the bare endpoint run the dense model on it (the JSON says where each replica ran it).
JSON goes to bench/results/serve_load-<device>.json (`rows`: per cell, p50/p99 and rows/s of bare and terarec and
their ratios), a table to bench/results/serve_load.md (serve_load-<device>.md on a GPU machine).

    python bench/serve_load.py [--seconds 3] [--max-requests 3000]
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

from results import RESULTS, device_name, device_slug, record  # bench/results.py
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


async def load(urls: list[str], bodies: list[bytes], batch: int, headers: dict, concurrency: int, seconds: float,
               max_requests: int) -> dict:
    """`concurrency` clients (client i at urls[i % len(urls)]) send the bodies in turn, back to back, until the time
    or the request budget runs out."""
    latencies: list[float] = []
    errors, sent = 0, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120, headers=headers) as client:
        for url in urls:
            for body in bodies[:3]:  # warm: connections, the model's first forward
                await client.post(url, content=body)
        deadline = time.perf_counter() + seconds

        async def client_loop(url: str):
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
        await asyncio.gather(*(client_loop(urls[i % len(urls)]) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    if not latencies:
        raise RuntimeError(f"every request to {urls} failed ({errors} errors)")
    ms = np.array(latencies) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "rows_per_s": len(latencies) * batch / elapsed, "requests": len(latencies), "errors": errors}


def run_cells(targets: dict[str, tuple], args, concurrencies=CONCURRENCY) -> dict:
    """Every cell (rows per request, clients) for each target (name: urls, bodies, headers[, forwards]) in turn: the
    targets a cell compares run within seconds of each other (on a shared machine the load drifts over minutes).
    `forwards()`, where given, reads the replica's (forwards, rows) counters: the cell records rows per forward."""
    figures: dict = {name: {} for name in targets}
    for batch in BATCHES:
        for concurrency in concurrencies:
            for name, (urls, bodies, headers, *forwards) in targets.items():
                before = forwards[0]() if forwards else None
                cell = asyncio.run(load(urls, bodies[batch], batch, headers, concurrency, args.seconds, args.max_requests))
                if forwards:
                    after = forwards[0]()
                    cell["rows_per_forward"] = (after[1] - before[1]) / max(1, after[0] - before[0])
                figures[name][f"batch{batch}_c{concurrency}"] = cell
                print(f"{name:21s} batch {batch:3d} c {concurrency:2d}: p50 {cell['p50_ms']:7.2f} ms  p99 "
                      f"{cell['p99_ms']:7.2f} ms  {cell['rows_per_s']:9.0f} rows/s  ({cell['requests']} requests, "
                      f"{cell['errors']} errors{', %.0f rows per forward' % cell['rows_per_forward'] if forwards else ''})",
                      flush=True)
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


TERAREC = ("terarec", "terarec_arrow", "terarec_control_plane")


def summary_rows(figures: dict) -> list[dict]:
    """One row per cell: bare's and each terarec path's p50/p99 ms and rows/s, and terarec's (its own ingress, JSON)
    ratios to bare: p50 and p99 (lower is better) and rows/s (higher is better)."""
    rows = []
    for batch in BATCHES:
        for concurrency in CONCURRENCY:
            key = f"batch{batch}_c{concurrency}"
            row = {"rows_per_request": batch, "clients": concurrency,
                   "terarec_rows_per_forward": figures["terarec"][key].get("rows_per_forward")}
            for name in ("bare", *TERAREC):
                cell = figures[name][key]
                row[name] = {"p50_ms": cell["p50_ms"], "p99_ms": cell["p99_ms"], "rows_per_s": cell["rows_per_s"]}
            bare, terarec = row["bare"], row["terarec"]
            row["ratio"] = {"p50": terarec["p50_ms"] / bare["p50_ms"], "p99": terarec["p99_ms"] / bare["p99_ms"],
                            "rows_per_s": terarec["rows_per_s"] / bare["rows_per_s"]}
            rows.append(row)
    return rows


def markdown(figures: dict, settings: dict) -> str:
    lines = ["# Online inference under load (bench/serve_load.py)", "",
             f"{device_name()}, {settings['date']}, commit {settings['commit']}; {settings['model']} checkpoint, "
             f"{settings['seconds']} s or {settings['max_requests']} requests per cell, loopback HTTP; load generator, "
             f"servers and Ray share the {settings['cpus']} cores (load average {settings['load_average_1m']:.1f} at the "
             "end).", "",
             f"terarec: {settings['replicas']} replica(s) (@serve.batch, recent rows cached, dense model on "
             f"{settings['replica_device']}) answering on their own ports (the clients spread over them) -> 2 embedding "
             "servers; Arrow: the same with Arrow IPC bodies of the Criteo columns and Arrow replies; control plane: the "
             "same deployment through `terarec serve` and a Serve handle call. bare: FastAPI + torch in one process "
             f"(a declared JSON body, same model, rows in a local store, on {settings['bare_device']}).", "",
             "| rows/request | clients | terarec p50 / p99 ms | terarec rows/s | bare p50 / p99 ms | bare rows/s | "
             "p50 ratio | p99 ratio | rows/s ratio | Arrow p50 / p99 ms | Arrow rows/s | control plane p50 / p99 ms | "
             "control plane rows/s | terarec rows per forward |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in figures["rows"]:
        cell = {name: f"{row[name]['p50_ms']:.2f} / {row[name]['p99_ms']:.2f} | {row[name]['rows_per_s']:,.0f}"
                for name in ("bare", *TERAREC)}
        ratio, merged = row["ratio"], row["terarec_rows_per_forward"]
        lines.append(f"| {row['rows_per_request']} | {row['clients']} | {cell['terarec']} | {cell['bare']} | "
                     f"{ratio['p50']:.2f}x | {ratio['p99']:.2f}x | {ratio['rows_per_s']:.2f}x | {cell['terarec_arrow']} | "
                     f"{cell['terarec_control_plane']} | {'—' if merged is None else f'{merged:,.0f}'} |")
    tiered = figures["tiered_servers"]
    lines += ["", "One client, three terarec deployments (each replica's own ingress): the replica's row cache on "
              "(above), off (every request asks the servers), and off with the servers on cached_host whose caches "
              f"hold {tiered['cache_rows']:,.0f} of the table's {tiered['table_rows']:,.0f} rows (hit rate "
              f"{tiered['hit_rate']:.1%} over the run).", "",
              "| rows/request | cached p50 / p99 ms | no replica cache p50 / p99 ms | tiered servers p50 / p99 ms |",
              "| ---: | ---: | ---: | ---: |"]
    for batch in BATCHES:
        key = f"batch{batch}_c1"
        cells = [figures[name][key] for name in ("terarec", "terarec_no_recent", "terarec_tiered")]
        lines.append(f"| {batch} | " + " | ".join(f"{cell['p50_ms']:.2f} / {cell['p99_ms']:.2f}" for cell in cells) + " |")
    lines += ["", "Pieces of one single-row request (median ms, timed from a driver): "
              + ", ".join(f"{name.replace('_', ' ')} {ms:.2f}" for name, ms in figures["hops"].items()) + "."]
    return "\n".join(lines) + "\n"


def deploy(base: str, headers: dict, name: str, checkpoint: str, replicas: int = 1, **fields) -> dict:
    """POST /v1/models, then the model's view (its replicas' endpoints, where they run the dense model)."""
    response = httpx.post(f"{base}/v1/models", headers=headers, timeout=300,
                          json={"name": name, "checkpoint": checkpoint, "replicas": replicas, "servers": 2, **fields})
    if response.status_code != 200:
        raise RuntimeError(f"deploying {name} failed: {response.status_code} {response.text[:500]}")
    for _ in range(100):  # a replica lists its endpoint as it starts; a rollout's or a restart's may lag
        view = httpx.get(f"{base}/v1/models/{name}", headers=headers, timeout=60).json()
        if len(view["endpoints"] or []) == replicas:
            return view
        time.sleep(0.2)
    raise RuntimeError(f"model {name}: {replicas} replicas but endpoints {view['endpoints']}")


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
    parser.add_argument("--seconds", type=float, default=3.0, help="load duration per cell")
    parser.add_argument("--max-requests", type=int, default=3000, help="request budget per cell")
    parser.add_argument("--rows", type=int, default=50_000, help="synthetic rows to train on")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cpus", type=int, default=max(4, os.cpu_count() or 1),
                        help="CPUs of the local Ray (default: all, at least 4: replicas and servers mostly wait)")
    parser.add_argument("--replicas", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                        help="terarec's replicas (default: one per 4 cores, at most 4)")
    parser.add_argument("--gpus", type=float, default=None, help="GPUs shared by the replicas and servers, the bare "
                        "endpoint on the GPU too (default: 1 if there is one, else 0)")
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return bare_server(int(args.bare_server[0]), args.bare_server[1])
    import torch

    from terarec.actors.serve_env import use_serve_env

    if args.gpus is None:
        args.gpus = 1.0 if torch.cuda.is_available() else 0.0
    use_serve_env()  # this driver's handle (`hops`) as the control plane's
    import ray

    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="serve-load-")
    data, checkpoint = make_checkpoint(workdir, args.rows, args.steps)
    dense, sparse = eval_rows(data)
    bodies, arrow_bodies = request_bodies(dense, sparse), request_bodies(dense, sparse, arrow=True)
    figures: dict = {}

    bare_port = free_port()
    bare_env = os.environ | ({} if args.gpus else {"CUDA_VISIBLE_DEVICES": ""})  # the same device as terarec
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port), checkpoint], env=bare_env)
    context = ray.init(num_cpus=args.cpus, num_gpus=1 if args.gpus else 0, include_dashboard=False, namespace="terarec")
    token, port = secrets.token_hex(16), free_port()
    env = os.environ | {"TERAREC_API_TOKEN": token, "TERAREC_DB_PATH": os.path.join(workdir, "jobs.db"),
                        "RAY_ADDRESS": context.address_info["address"]}
    api = subprocess.Popen([sys.executable, "-m", "terarec.platform.cli", "serve", "--port", str(port),
                            "--log-level", "warning"], env=env, cwd=workdir)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    base = f"http://127.0.0.1:{port}"
    table_bytes = sum(os.path.getsize(path) for path in glob.glob(os.path.join(checkpoint, "shard-*")))
    predict = "/v1/models/{}/predict"
    try:
        wait_up(f"http://127.0.0.1:{bare_port}/docs", bare)
        wait_up(f"{base}/healthz", api)
        # a GPU split between the replicas (the dense model) and the 2 servers (their rows): a quarter each for servers
        on_gpu = {"server_gpus": args.gpus / 4, "serving": {"gpus": args.gpus / 2 / args.replicas,
                                                            "max_batch_rows": 65536}} if args.gpus else {}
        view = deploy(base, headers, "bench", checkpoint, replicas=args.replicas, **on_gpu)
        direct = [url + predict.format("bench") for url in view["endpoints"]]

        def forwards() -> tuple[int, int]:  # one replica's counters: the cells' rows per forward with one replica
            counts = httpx.get(f"{base}/v1/models/bench", headers=headers, timeout=60).json()
            return counts["forwards"], counts["forward_rows"]

        figures |= run_cells({"bare": ([f"http://127.0.0.1:{bare_port}/predict"], bodies, {"Content-Type": "application/json"}),
                              "terarec": (direct, bodies, headers, *([forwards] if args.replicas == 1 else [])),
                              "terarec_arrow": ([url + "?transformed=true" for url in direct], arrow_bodies,
                                                headers | {"Content-Type": ARROW}),
                              "terarec_control_plane": ([base + predict.format("bench")], bodies, headers)}, args)
        figures["rows"] = summary_rows(figures)
        figures["hops"] = hops("bench", checkpoint, dense, sparse, bodies, arrow_bodies)
        httpx.delete(f"{base}/v1/models/bench", headers=headers, timeout=120)  # frees its GPU share for the next two
        alone = {"server_gpus": args.gpus / 4} if args.gpus else {}
        no_recent = deploy(base, headers, "direct", checkpoint, serving={"recent_rows": 0}, **alone)
        store = {"kind": "cached_host", "cache_bytes": table_bytes / 2 / 4}  # per server: a quarter of its half
        tiered = deploy(base, headers, "tiered", checkpoint, serving={"recent_rows": 0}, store=store, **alone)
        figures |= run_cells({"terarec_no_recent": ([no_recent["endpoints"][0] + predict.format("direct")], bodies, headers),
                              "terarec_tiered": ([tiered["endpoints"][0] + predict.format("tiered")], bodies, headers)},
                             args, concurrencies=(1,))
        figures["tiered_servers"] = tiered_servers("tiered", checkpoint)
        for name in ("direct", "tiered"):
            httpx.delete(f"{base}/v1/models/{name}", headers=headers, timeout=120)
    finally:
        bare.terminate()
        bare.wait()
        api.terminate()
        api.wait()
        ray.shutdown()

    from results import commit

    settings = {"seconds": args.seconds, "max_requests": args.max_requests, "rows": args.rows, "steps": args.steps,
                "model": "dlrm (default sizes, embedding dim 16)", "batches": BATCHES, "concurrency": CONCURRENCY,
                "table_bytes": table_bytes, "ray_cpus": args.cpus, "replicas": args.replicas, "gpus": args.gpus,
                "replica_device": view["device"], "bare_device": "cuda" if args.gpus else "cpu", "bare_workers": 1,
                "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
                "commit": commit(), "wall_s": round(time.monotonic() - started, 1)}
    name = f"serve_load-{device_slug()}"
    record(name, figures, settings)
    table = "serve_load" if device_slug() == "cpu" else name  # a GPU run leaves the CPU table as it is
    with open(os.path.join(RESULTS, f"{table}.md"), "w") as stream:
        stream.write(markdown(figures, settings))
    print(markdown(figures, settings))


if __name__ == "__main__":
    main()
