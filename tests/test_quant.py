"""int8 row quantization: the error bound on every row, the fused kernel against the reference, exchanges.

The bound: |x - decode(encode(x))| <= s / 2 per element, s = max(absmax / 127, tiny),
plus the float32 rounding of q * s and of x / s (under 2^-16 s: |q| <= 127 < 2^7)
and `tiny` itself for subnormal inputs, which GPUs may flush to zero. Without CUDA the Triton kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py for the session); with CUDA, compiled.
Inputs are fresh random draws on every run.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("triton")

from helpers import free_port, job  # noqa: E402

from terarec.kernels.comm import GlooCommunicator  # noqa: E402
from terarec.kernels.quant import (TINY, decode_rows, dequantize_int8_reference, encode_rows,  # noqa: E402
                                   quantize_int8_reference)
from terarec.kernels.triton_quant import dequantize_rows, quantize_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def step_of(rows: torch.Tensor) -> torch.Tensor:
    """The quantization step of each row, [N, 1]."""
    return (rows.float().abs().amax(dim=1, keepdim=True) / 127).clamp_min(TINY)


def assert_within_half_step(decoded: torch.Tensor, rows: torch.Tensor, what: str) -> None:
    step = step_of(rows)
    error = (decoded - rows.float()).abs()
    bound = step / 2 + step * 2 ** -16 + TINY
    worst = (error / bound).amax(dim=1)
    assert torch.isfinite(decoded).all(), f"{what}: non-finite output"
    assert (worst <= 1).all(), f"{what}: row {int(worst.argmax())} off by {float(worst.max()):.3f} of its bound"


def rows_of_every_kind(n: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    """Random rows at magnitudes from subnormal to near float max, with zero rows and one-hot rows among them."""
    exponents = torch.randint(-45, 37, (n, 1)).float() if dtype == torch.float32 else torch.randint(-6, 4, (n, 1)).float()
    rows = torch.randn(n, dim) * 10.0 ** exponents
    rows[::7] = 0.0
    rows[3::11] = 0.0
    rows[3::11, 0] = -2.5  # one-hot rows: the absmax element itself round-trips exactly
    return rows.to(dtype).to(DEVICE)


def packed_reference(rows: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_int8_reference(rows)
    return torch.cat([q.view(torch.uint8), scale.unsqueeze(1).view(torch.uint8)], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, dim", [(257, 128), (100, 16), (33, 26), (5, 1)])
def test_every_row_within_half_a_step(n, dim, dtype):
    rows = rows_of_every_kind(n, dim, dtype)
    q, scale = quantize_int8_reference(rows.cpu())
    assert_within_half_step(dequantize_int8_reference(q, scale).to(DEVICE), rows, "reference")
    assert_within_half_step(dequantize_rows(quantize_rows(rows), dim), rows, "triton")
    assert_within_half_step(decode_rows(encode_rows(rows, "int8"), "int8", dim), rows, "encode/decode")


@pytest.mark.parametrize("n, dim", [(1000, 128), (77, 24), (16, 3)])
def test_triton_matches_the_reference_bit_for_bit(n, dim):
    rows = (torch.randn(n, dim) * torch.rand(n, 1) * 100).to(DEVICE)
    rows[n // 2] = 0.0
    payload = quantize_rows(rows)
    expected = packed_reference(rows)
    assert payload.shape == (n, dim + 4) and payload.dtype == torch.uint8
    assert torch.equal(payload, expected), f"{int((payload != expected).any(1).sum())} rows differ"
    poisoned = torch.full((n, dim), float("nan"), device=DEVICE)
    decoded = dequantize_rows(payload, dim)
    poisoned.copy_(decoded)
    assert torch.equal(poisoned, decode_rows(expected.cpu(), "int8", dim).to(DEVICE))


def test_strided_rows_quantize_like_contiguous_ones():
    table = torch.randn(50, 40, device=DEVICE)
    view = table[:, 4:36]  # row stride 40, 32 columns
    assert torch.equal(quantize_rows(view), packed_reference(view.contiguous()))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("quantize", [quantize_int8_reference, quantize_rows], ids=["reference", "triton"])
def test_nan_or_inf_rows_raise_a_value_error(quantize, bad):
    rows = torch.randn(40, 16, device=DEVICE)
    rows[17, 3] = bad
    rows[30, 0] = bad
    with pytest.raises(ValueError, match="2 of 40 rows with NaN or Inf"):
        quantize(rows)


@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16", "int8"])
def test_empty_batches_encode_and_decode(wire):
    payload = encode_rows(torch.empty(0, 16, device=DEVICE), wire)
    assert payload.shape[0] == 0
    assert decode_rows(payload, wire, 16).shape == (0, 16)


@pytest.mark.parametrize("wire, rtol, atol", [("fp32", 0.0, 0.0), ("bf16", 2 ** -8, 0.0), ("fp16", 2 ** -11, 2 ** -25)])
def test_float_wires_round_to_their_format(wire, rtol, atol):
    rows = torch.randn(64, 32, device=DEVICE)
    decoded = decode_rows(encode_rows(rows, wire), wire, 32)
    assert decoded.dtype == torch.float32
    assert ((decoded - rows).abs() <= rtol * rows.abs() + atol).all()  # atol: fp16's subnormal spacing / 2


def test_unknown_wire_format_names_the_choices():
    with pytest.raises(ValueError, match="choose one of fp32, bf16, fp16, int8"):
        encode_rows(torch.randn(2, 2), "int4")


# ---- exchange over real gloo processes ------------------------------------------------------

def rows_from(sender: int, receiver: int, dim: int, seed: int) -> torch.Tensor:
    """The rows `sender` sends `receiver`: a count and values both sides can regenerate."""
    generator = torch.Generator().manual_seed(seed * 1000 + sender * 10 + receiver)
    count = int(torch.randint(0, 300, (1,), generator=generator))
    scales = 10.0 ** torch.randint(-3, 4, (count, 1), generator=generator)
    return torch.randn(count, dim, generator=generator) * scales


def exchange_worker(rank: int, world: int, port: int, dim: int, seed: int) -> None:
    """One gloo rank: fp32 exchange exact, int8 and bf16 exchanges within their bounds of it (asserts raise to the parent)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        comm = GlooCommunicator()
        outgoing = [rows_from(rank, peer, dim, seed) for peer in range(world)]
        counts = [len(rows) for rows in outgoing]
        rows = torch.cat(outgoing)
        exact, recv_counts = comm.all_to_all(rows, counts)
        expected = torch.cat([rows_from(peer, rank, dim, seed) for peer in range(world)])
        assert recv_counts == [len(rows_from(peer, rank, dim, seed)) for peer in range(world)]
        assert torch.equal(exact, expected)
        for wire in ("int8", "bf16"):
            payload, _ = comm.all_to_all(encode_rows(rows, wire), counts)
            decoded = decode_rows(payload, wire, dim)
            if wire == "int8":
                assert_within_half_step(decoded, exact, f"rank {rank} int8 exchange")
            else:
                assert ((decoded - exact).abs() <= 2 ** -8 * exact.abs()).all()
    finally:
        dist.destroy_process_group()


def test_int8_exchange_equals_fp32_exchange_within_the_bound(world=3):
    seed = int(torch.randint(0, 10**6, (1,)))
    mp.start_processes(exchange_worker, args=(world, free_port(), 24, seed), nprocs=world, start_method="spawn")


# ---- a real Ray training run: int8 rows and gradients vs fp32 ---------------------------------

@pytest.mark.slow
def test_int8_exchange_trains_like_fp32(ray_cluster, synth_data, tmp_path):
    from terarec.platform.runner import run_training

    fp32 = run_training(job(synth_data, tmp_path / "fp32", 2, steps=40))
    int8 = run_training(job(synth_data, tmp_path / "int8", 2, steps=40,
                            **{"embedding.comm_dtype": "int8", "embedding.grad_comm_dtype": "int8"}))
    assert int8["steps"] == fp32["steps"] == 40
    assert abs(int8["auc"] - fp32["auc"]) < 1e-3, (fp32["auc"], int8["auc"])
