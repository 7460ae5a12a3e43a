"""Embedding all-to-all over NCCL on the GPUs of one host: fp32 vs bf16 vs int8 rows on the wire.

One process per GPU (a gloo group hands out rank 0's NCCL unique ID, as under
Ray Train). Each GPU holds samples x 26 features x 128-wide rows and sends an
equal share to every GPU (itself included), as the DLRM lookup does. Timed with
CUDA events, medians over iterations, the slowest rank reported:
- quantize / dequantize: the fused Triton kernels alone (GB/s read + written);
- all-to-all: `Communicator.all_to_all` of the payload (the count exchange included);
- exchange: encode + all-to-all + decode, what a training step pays.
Bytes on the wire are what leaves each GPU; bus bandwidth is NCCL's for
all-to-all, algbw x (W - 1) / W. With one GPU the all-to-all is NCCL's copy to
itself: a sanity run, not a figure for the wire. Writes
bench/results/exchange_gpu-<W>gpu.json.

    python bench/exchange_gpu.py [--samples 16384 65536 262144] [--iters 20]
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from terarec.kernels.comm import default_communicator
from terarec.kernels.nccl import NcclCommunicator
from terarec.kernels.quant import decode_rows, encode_rows
from terarec.kernels.triton_quant import dequantize_rows, quantize_rows

from results import record  # bench/results.py
from timing import median_ms  # bench/timing.py

FEATURES, DIM = 26, 128
WIRES = ["fp32", "bf16", "int8"]


def slowest(ms: float) -> float:
    value = torch.tensor([ms], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)  # over gloo, on the host
    return value.item()


def run_rank(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = default_communicator() if world > 1 else NcclCommunicator.from_process_group()
    assert isinstance(comm, NcclCommunicator), f"expected NCCL, got {type(comm).__name__} (is cupy installed?)"
    rows_out = []
    for samples in args.samples:
        n = samples * FEATURES
        n -= n % world
        counts = [n // world] * world
        rows = torch.randn(n, DIM, device="cuda")
        for wire in WIRES:
            payload = encode_rows(rows, wire)
            figures = {"samples": samples, "rows": n, "wire": wire, "world": world,
                       "payload_mb": payload.numel() * payload.element_size() / 1e6}
            if wire == "int8":
                q_ms = slowest(median_ms(lambda: quantize_rows(rows), args.iters, warmup=3))
                d_ms = slowest(median_ms(lambda: dequantize_rows(payload, DIM), args.iters, warmup=3))
                figures |= {"quantize_ms": q_ms, "quantize_gbs": (rows.numel() * 4 + payload.numel()) / q_ms / 1e6,
                            "dequantize_ms": d_ms, "dequantize_gbs": (rows.numel() * 4 + payload.numel()) / d_ms / 1e6}
            a2a_ms = slowest(median_ms(lambda: comm.all_to_all(payload, counts), args.iters, warmup=3))
            exchange_ms = slowest(median_ms(lambda: decode_rows(comm.all_to_all(encode_rows(rows, wire), counts)[0],
                                                                wire, DIM), args.iters, warmup=3))
            wire_bytes = figures["payload_mb"] * 1e6 * (world - 1) / world
            algbw = figures["payload_mb"] * 1e6 / a2a_ms / 1e6
            figures |= {"wire_mb_per_gpu": wire_bytes / 1e6, "all_to_all_ms": a2a_ms, "algbw_gbs": algbw,
                        "busbw_gbs": algbw * (world - 1) / world, "exchange_ms": exchange_ms}
            rows_out.append(figures)
            dist.barrier()
        del rows, payload
        torch.cuda.empty_cache()
    if rank == 0:
        out.extend(rows_out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, nargs="+", default=[16384, 65536, 262144],
                        help="samples per GPU (x 26 features x 128 dims)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    world = torch.cuda.device_count()
    if world == 0:
        raise SystemExit("exchange_gpu needs CUDA GPUs (and cupy with NCCL)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().list()
    mp.start_processes(run_rank, args=(world, port, args, out), nprocs=world, start_method="spawn")
    rows = list(out)
    print(f"\nall-to-all over NCCL, {world} x {torch.cuda.get_device_name()}, rows of {FEATURES} x {DIM} per sample")
    print("| samples/GPU | wire | payload MB/GPU | on the wire MB/GPU | all-to-all ms | busbw GB/s | "
          "exchange ms (encode+a2a+decode) | vs fp32 | quantize ms | dequantize ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fp32_ms = {row["samples"]: row["exchange_ms"] for row in rows if row["wire"] == "fp32"}
    for row in rows:
        quant = (f"{row['quantize_ms']:.3f} | {row['dequantize_ms']:.3f}" if row["wire"] == "int8" else "— | —")
        print(f"| {row['samples']} | {row['wire']} | {row['payload_mb']:.1f} | {row['wire_mb_per_gpu']:.1f} | "
              f"{row['all_to_all_ms']:.3f} | {row['busbw_gbs']:.1f} | {row['exchange_ms']:.3f} | "
              f"{fp32_ms[row['samples']] / row['exchange_ms']:.2f}x | {quant} |")
    record(f"exchange_gpu-{world}gpu", {"rows": rows}, vars(args))


if __name__ == "__main__":
    main()
