"""Fused kernels against their torch references, forward and backward, fp32 and bf16.

Without CUDA the Triton launchers run on CPU tensors through Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py for the session);
with CUDA they run compiled on the GPU. Inputs are fresh random draws; the
reference runs in float64; tolerances are relative norms fit to the dtype.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from terarec.kernels import cross_v1, cross_v2, dot_interaction, fused_mlp, gather_rows, gather_sum  # noqa: E402
from terarec.kernels.cross import cross_v1_reference, cross_v2_reference  # noqa: E402
from terarec.kernels.gather import (gather_rows_reference, gather_sum_reference,  # noqa: E402
                                    reduce_by_key_reference, unique_with_order)
from terarec.kernels.interaction import dot_interaction_reference  # noqa: E402
from terarec.kernels.mlp import FusedMLPFunction, fused_mlp_reference  # noqa: E402
from terarec.kernels import triton_cross  # noqa: E402
from terarec.kernels.dispatch import fused_kernels  # noqa: E402
from terarec.kernels.triton_cross import FusedCrossV1, FusedCrossV2  # noqa: E402
from terarec.kernels.triton_dropout import relu_dropout, relu_mask_backward, unpack_bits  # noqa: E402
from terarec.kernels.triton_gather import (GatherRows, GatherSum, reduce_by_key_forward,  # noqa: E402
                                           reduce_sorted_forward)
from terarec.kernels.triton_interaction import FusedDotInteraction  # noqa: E402
from terarec.kernels.triton_mlp import masked_grad_matmul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]
gpu = pytest.mark.gpu


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype, what, floor=0.0):
    """Relative norm error under the dtype's tolerance (or `floor`, twice the same-dtype reference's own error)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error, tolerance = relative_error(actual, expected), max(TOLERANCE[dtype], floor)
    assert error < tolerance, f"{what}: relative error {error:.2e} over {tolerance:.1e} ({dtype})"


def outputs_and_grads(fn, inputs, grad):
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, [x for x in inputs if x.is_floating_point()], grad.to(out.dtype))]


def check_against_reference(fused, reference, inputs, dtype):
    """fused(*inputs) vs reference(*float64 inputs): output and the gradient of every float input.

    The tolerance is the dtype's, or twice the error of the reference itself run
    in the inputs' dtype (rounding that compounds through layers in bf16).
    """
    ref_inputs = [x.detach().double().requires_grad_() if x.is_floating_point() else x for x in inputs]
    ref_out = reference(*ref_inputs)
    grad = torch.randn_like(ref_out)
    expected = outputs_and_grads(reference, ref_inputs, grad)
    same_dtype = outputs_and_grads(reference, inputs, grad) if dtype != torch.float32 else expected
    actual = outputs_and_grads(fused, inputs, grad)
    assert actual[0].shape == expected[0].shape
    for i, (a, s, e) in enumerate(zip(actual, same_dtype, expected)):
        assert_close(a, e, dtype, "forward" if i == 0 else f"gradient of float input {i - 1}",
                     floor=2 * relative_error(s, e))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("self_interaction, pad_to, num_sparse, dim", [
    (False, None, 26, 32), (True, 8, 5, 24), (False, 32, 3, 16)])
def test_dot_interaction(dtype, self_interaction, pad_to, num_sparse, dim):
    inputs = [rand(6, dim, dtype=dtype), rand(6, num_sparse, dim, dtype=dtype)]
    check_against_reference(lambda d, s: FusedDotInteraction.apply(d, s, self_interaction, pad_to),
                            lambda d, s: dot_interaction_reference(d, s, self_interaction, pad_to), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("matrix", [False, True])
def test_cross(dtype, matrix, monkeypatch):
    monkeypatch.setattr(triton_cross, "BWD_PROGRAMS", 2)           # several row blocks per backward program
    dim = 24
    inputs = [rand(70, dim, dtype=dtype), rand(70, dim, dtype=dtype),
              rand(*((dim, dim) if matrix else (dim,)), dtype=dtype, scale=dim ** -0.5), rand(dim, dtype=dtype)]
    fused, reference = (FusedCrossV2, cross_v2_reference) if matrix else (FusedCrossV1, cross_v1_reference)
    check_against_reference(fused.apply, reference, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("last_activation", [False, True])
@pytest.mark.parametrize("width, x_grad", [(13, True), (13, False), (40, True)])
def test_fused_mlp(dtype, last_activation, width, x_grad):
    """Backward through the masked GEMMs, with and without an input gradient."""
    sizes = [width, 48, 80, 16]
    weights = [rand(o, i, dtype=dtype, scale=i ** -0.5) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rand(o, dtype=dtype) for o in sizes[1:]]
    x = rand(70, width, dtype=dtype)
    n = len(weights)
    fused = lambda x, *p: FusedMLPFunction.apply(x, last_activation, 0.0, *p)
    reference = lambda x, *p: fused_mlp_reference(x, list(p[:n]), list(p[n:]), last_activation)
    if x_grad:
        check_against_reference(fused, reference, [x, *weights, *biases], dtype)
    else:
        x = x.detach()
        check_against_reference(lambda *p: fused(x, *p), lambda *p: reference(x.to(p[0].dtype), *p),
                                [*weights, *biases], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_dropout_bitmask(dtype):
    p = 0.3
    h = torch.randn(70, 100, device=DEVICE).to(dtype)
    out, words = relu_dropout(h, p)
    keep = unpack_bits(words, 100)
    assert words.dtype == torch.int32 and words.shape == (70, 4)
    assert_close(out, torch.where(keep, h.double().relu() / (1 - p), 0.0), dtype, "forward")
    assert not keep[h <= 0].any()
    kept = keep[h > 0].double().mean().item()
    assert abs(kept - (1 - p)) < 0.06, f"kept fraction {kept:.3f} of positive inputs, expected {1 - p}"
    grad = torch.randn(70, 100, device=DEVICE).to(dtype)
    d_pre, d_bias = relu_mask_backward(grad, words, 1 / (1 - p))
    ref = torch.where(keep, grad.double() / (1 - p), 0.0)
    assert_close(d_pre, ref, dtype, "backward")
    assert_close(d_bias, ref.sum(0), torch.float32, "bias gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("from_bits", [False, True])
@pytest.mark.parametrize("m, k, n", [(70, 48, 80), (130, 1, 40), (64, 13, 100)])
def test_masked_grad_matmul(dtype, from_bits, m, k, n):
    """(grad @ weight) * mask * scale and its column sums, the mask from the bits or from the ReLU output;
    M = 130 spans row blocks, K = 1 is a top MLP's last layer."""
    grad = torch.randn(m, k, device=DEVICE).to(dtype)
    weight = (torch.randn(k, n, device=DEVICE) * k ** -0.5).to(dtype)
    h = torch.randn(m, n, device=DEVICE).to(dtype)
    if from_bits:
        mask_src, scale = relu_dropout(h, 0.4)[1], 1 / 0.6
        on = unpack_bits(mask_src, n)
    else:
        mask_src, scale = h.relu(), 1.0
        on = h > 0
    d_pre, d_bias = masked_grad_matmul(grad, weight, mask_src, scale)
    ref = torch.where(on, grad.double() @ weight.double() * scale, 0.0)
    tolerance = torch.bfloat16 if dtype != torch.float32 else dtype
    assert d_pre.dtype == dtype and d_bias.dtype == torch.float32
    assert_close(d_pre, ref, tolerance, "masked gradient")
    assert_close(d_bias, ref.sum(0), tolerance, "bias gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_mlp_dropout_backward_in_dtype(dtype):
    """Dropout on, three layers: the backward GEMMs apply each hidden layer's bits and scale (checked through
    the reference run with the masks the forward drew, ReLU included, read back from the saved bits)."""
    sizes = [24, 64, 96, 8]
    weights = [rand(o, i, dtype=dtype, scale=i ** -0.5) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rand(o, dtype=dtype) for o in sizes[1:]]
    x, p, n = rand(90, sizes[0], dtype=dtype), 0.25, len(weights)
    torch.manual_seed(3)
    out = FusedMLPFunction.apply(x, False, p, *weights, *biases)
    keeps = [unpack_bits(bits, bits.shape[1] * 32) for bits in out.grad_fn.saved_tensors[2 * n:3 * n - 1]]

    def reference(x, *params):
        h = x
        for i in range(n):
            h = h @ params[i].t() + params[n + i]
            if i < n - 1:
                h = torch.where(keeps[i][:, :h.shape[1]], h / (1 - p), 0.0)        # the bits hold h > 0 too
        return h

    def fused(*inputs):
        torch.manual_seed(3)
        return FusedMLPFunction.apply(inputs[0], False, p, *inputs[1:])

    check_against_reference(fused, reference, [x, *weights, *biases], dtype)


def test_bitmask_is_an_eighth_of_a_bool_mask():
    h = torch.randn(64, 256, device=DEVICE)
    _, words = relu_dropout(h, 0.5)
    bool_mask = h > 0
    assert words.numel() * words.element_size() * 8 == bool_mask.numel() * bool_mask.element_size()


def test_fused_mlp_dropout_matches_its_masks():
    """With dropout: the same seed gives the same masks, and forward and backward are the reference MLP's
    with the masks the kernel drew (read back through an identity last layer)."""
    weights = [rand(32, 8, scale=0.3), torch.eye(32, device=DEVICE).requires_grad_()]
    biases = [rand(32), rand(32)]
    x = rand(40, 8)
    torch.manual_seed(7)
    out = FusedMLPFunction.apply(x, False, 0.5, *weights, *biases)
    torch.manual_seed(7)
    assert torch.equal(out, FusedMLPFunction.apply(x, False, 0.5, *weights, *biases))
    keep = (out - biases[1]).detach() != 0

    def reference(x, w0, w1, b0, b1):
        return fused_mlp_reference(x, [w0], [b0], last_activation=True) * keep * 2.0 @ w1.t() + b1

    inputs = [x, *weights, *biases]
    assert 0.1 < keep.double().mean().item() < 0.4          # about half positive, half of those kept
    def fused(*inputs):
        torch.manual_seed(7)
        return FusedMLPFunction.apply(inputs[0], False, 0.5, *inputs[1:])

    check_against_reference(fused, reference, inputs, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows_and_sum(dtype):
    store_values = torch.randn(50, 40, device=DEVICE).to(dtype)
    table = store_values[:, :24].detach().requires_grad_()           # strided rows, like a store's values
    idx = torch.randint(0, 50, (70,), device=DEVICE)
    check_against_reference(GatherRows.apply, gather_rows_reference, [table, idx], dtype)
    bags = torch.randint(0, 50, (20, 5), device=DEVICE)
    check_against_reference(GatherSum.apply, gather_sum_reference, [table, bags], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_by_key(dtype):
    grads = torch.randn(90, 24, device=DEVICE).to(dtype)
    inverse = torch.randint(0, 11, (90,), device=DEVICE)
    assert_close(reduce_by_key_forward(grads, inverse, 11), reduce_by_key_reference(grads.double(), inverse, 11),
                 dtype, "reduce_by_key")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_sorted_runs(dtype):
    """The per-key sum over runs of equal keys (the order `unique_with_order` gives) equals the reference, with a
    hot key whose run spans several blocks, keys seen once, and a run cut by a block's end."""
    keys = torch.cat([torch.full((150,), 5), torch.randint(0, 400, (130,)), torch.arange(1000, 1040)]).to(DEVICE)
    keys = keys[torch.randperm(keys.numel(), device=DEVICE)]
    unique, inverse, order = unique_with_order(keys)
    expected_unique, expected_inverse = torch.unique(keys, return_inverse=True)
    assert torch.equal(unique, expected_unique) and torch.equal(inverse, expected_inverse)
    assert torch.equal(keys[order.permutation], unique[order.sorted_inverse])   # runs of equal keys, in key order
    grads = torch.randn(keys.numel(), 24, device=DEVICE).to(dtype)
    assert_close(reduce_sorted_forward(grads, order.permutation, order.sorted_inverse, unique.numel()),
                 reduce_by_key_reference(grads.double(), inverse, unique.numel()), dtype, "reduce_sorted")
    table = torch.randn(unique.numel(), 24, device=DEVICE).to(dtype).requires_grad_()
    check_against_reference(lambda t, i: GatherRows.apply(t, i, None, order), gather_rows_reference,
                            [table, inverse], dtype)


def test_dispatchers_use_references_on_cpu():
    x = torch.randn(4, 8)
    assert torch.equal(dot_interaction(x, x.view(4, 1, 8)), dot_interaction_reference(x, x.view(4, 1, 8)))
    w, b = torch.randn(8), torch.randn(8)
    assert torch.equal(cross_v1(x, x, w, b), cross_v1_reference(x, x, w, b))
    w2 = torch.randn(8, 8)
    assert torch.equal(cross_v2(x, x, w2, b), cross_v2_reference(x, x, w2, b))
    table = torch.randn(10, 8)
    idx = torch.tensor([1, 1, 3])
    assert torch.equal(gather_rows(table, idx), table[idx])
    assert torch.equal(gather_sum(table, idx.view(1, 3)), table[idx].sum(0, keepdim=True))
    assert torch.equal(fused_mlp(x, [torch.eye(8)], [b]), fused_mlp_reference(x, [torch.eye(8)], [b]))


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dispatchers_run_fused_on_cuda():
    """The public ops take the fused path on CUDA and agree with the references (`fused_kernels(False)`)."""
    dense = torch.randn(64, 128, device="cuda", requires_grad=True)
    sparse = torch.randn(64, 26, 128, device="cuda", requires_grad=True)
    weights = [torch.randn(64, 479, device="cuda") * 0.05, torch.randn(1, 64, device="cuda") * 0.1]
    biases = [torch.randn(64, device="cuda"), torch.randn(1, device="cuda")]

    def step():
        out = fused_mlp(dot_interaction(dense, sparse), weights, biases)
        return out, dot_interaction(dense, sparse).grad_fn

    fused_out, fused_node = step()
    with fused_kernels(False):
        eager_out, eager_node = step()
    assert type(fused_node).__name__.startswith("FusedDotInteraction")
    assert not type(eager_node or object()).__name__.startswith("FusedDotInteraction")
    assert_close(fused_out, eager_out.double(), torch.float32, "DLRM-shaped forward")


def compiled_variants(kernel) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_call_sizes_compile_one_variant():
    """Sizes that vary per batch (row counts) compile no variant per size % 16 or size == 1 (do_not_specialize)."""
    from terarec.kernels import triton_gather, triton_sparse_update
    from terarec.store.optim import SparseAdagrad
    table = torch.randn(64, 16, device="cuda")
    values = torch.rand(64, 32, device="cuda")
    kernels = (triton_gather._gather_rows, triton_sparse_update._sparse_update)
    before = [compiled_variants(kernel) for kernel in kernels]
    for size in (1, 16, 17, 40):
        idx = torch.randperm(64, device="cuda")[:size]
        triton_gather.gather_rows_forward(table, idx)
        grads = torch.randn(size, 16, device="cuda")
        optimizer = SparseAdagrad(lr=0.1)
        triton_sparse_update.sparse_update_(values, idx, grads, optimizer.kind, **optimizer.fused_args(1))
    for kernel, count in zip(kernels, before):
        assert compiled_variants(kernel) - count <= 1, f"{kernel.fn.__name__} compiled per size"
