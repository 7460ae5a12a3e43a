"""Fused kernels against PyTorch eager and torch.compile of their references, at DLRM shapes.

Forward and forward+backward for each op, then a whole DLRM training step
(fused vs TERAREC_FUSED=0) and the same step (fused) in fp32, tf32 and bf16
(the `precision` setting). Times are medians of `triton.testing.do_bench`;
figures are compared with the ceilings of ARCHITECTURE.md. Prints a table and
writes bench/results/kernels-<device>.json, kernels.md and kernels.png (or
under --out). With --only, the named groups' rows replace theirs in the
existing results and the markdown says which rows were re-measured when.

    python bench/kernels.py [--out DIR] [--commit SHA] [--only mlp,dropout,...]
    python bench/kernels.py --only precision,gather --no-compile    # fp32 vs tf32 vs bf16 step; bf16 rows out
    TRITON_INTERPRET=1 python bench/kernels.py --small --no-compile    # CPU smoke run
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
from pathlib import Path

import timing  # bench/timing.py
from results import commit  # bench/results.py
import torch
import torch.nn.functional as F

from terarec.kernels.cross import cross_v1_reference, cross_v2_reference
from terarec.kernels.gather import gather_rows_reference, gather_sum_reference
from terarec.kernels.interaction import dot_interaction_reference
from terarec.kernels.mlp import FusedMLPFunction, fused_mlp_reference
from terarec.kernels.precision import autocast, matmul_precision
from terarec.kernels.triton_cross import FusedCrossV1, FusedCrossV2
from terarec.kernels.triton_dropout import relu_dropout, relu_mask_backward
from terarec.kernels.triton_gather import GatherRows, GatherSum
from terarec.kernels.triton_interaction import FusedDotInteraction

HBM_GBS = 2993.0            # ARCHITECTURE.md, H100 device-to-device copy (read + write)
TF32_TFLOPS = 406.0         # ARCHITECTURE.md, tf32 matmul 8192^3
CUDA = torch.cuda.is_available()
GROUPS = ("dlrm", "precision", "interaction", "mlp", "dropout", "cross", "gather")
DEVICE = "cuda" if CUDA else "cpu"


def median_ms(fn) -> float:
    """A kernel's time: triton's do_bench on CUDA (L2 flushed between runs), else three host-timed runs."""
    if CUDA:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return timing.median_ms(fn, iters=3)


def training_pass(fn, inputs, backward: bool):
    """A callable running fn(*inputs) with autograd on, and its backward with a fixed random gradient."""
    grad = torch.randn_like(fn(*inputs))
    float_inputs = [x for x in inputs if x.is_floating_point() and x.requires_grad]

    def run():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, float_inputs, grad)
    return run


class Table:
    """Rows of (op, pass) with a time per implementation, the fused figure and its ceiling."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, op: str, backward: bool, impls: dict, figure: tuple[float, str, float] | None = None,
            note: str = ""):
        """impls: name -> callable; figure: (work per call in bytes or flops, unit "GB/s" | "TFLOP/s", ceiling)."""
        times = {name: median_ms(fn) for name, fn in impls.items()}
        row = {"op": op, "pass": "fwd+bwd" if backward else "fwd", "ms": times, "note": note}
        if figure is not None:
            work, unit, ceiling = figure
            value = work / (times["fused"] * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
            row.update(figure=round(value, 1), unit=unit, of_ceiling=round(value / ceiling, 3))
        row["speedup_vs_eager"] = round(times["eager"] / times["fused"], 2)
        self.rows.append(row)
        print(self.format_row(row), flush=True)

    @staticmethod
    def format_row(row: dict) -> str:
        ms = row["ms"]
        cells = [f"{row['op']:<22}", f"{row['pass']:<8}"]
        cells += [f"{ms.get(k, float('nan')):9.3f}" for k in ("eager", "compile", "fused", "bare_gemms")]
        cells.append(f"{row['speedup_vs_eager']:6.2f}x")
        if "figure" in row:
            cells.append(f"{row['figure']:8.1f} {row['unit']:<7} {100 * row['of_ceiling']:5.1f}%")
        return " ".join(cells)

    def markdown(self) -> str:
        lines = ["| op | pass | eager ms | compile ms | fused ms | bare GEMMs ms | fused vs eager | fused figure | of ceiling |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            ms = r["ms"]
            cell = lambda k: f"{ms[k]:.3f}" if k in ms else "—"
            fig = f"{r['figure']} {r['unit']}" if "figure" in r else "—"
            ceil = f"{100 * r['of_ceiling']:.0f}%" if "figure" in r else "—"
            lines.append(f"| {r['op']} | {r['pass']} | {cell('eager')} | {cell('compile')} | {cell('fused')} | "
                         f"{cell('bare_gemms')} | {r['speedup_vs_eager']}× | {fig} | {ceil} |")
        return "\n".join(lines)


def compiled(fn, enabled: bool):
    return torch.compile(fn) if enabled else None


def impls(eager, fused, compile_fn, inputs, backward):
    out = {"eager": training_pass(eager, inputs, backward), "fused": training_pass(fused, inputs, backward)}
    if compile_fn is not None:
        out["compile"] = training_pass(compile_fn, inputs, backward)
    return out


def bench_interaction(table: Table, batch: int, use_compile: bool):
    num_sparse, dim = 26, 128
    dense = torch.randn(batch, dim, device=DEVICE, requires_grad=True)
    sparse = torch.randn(batch, num_sparse, dim, device=DEVICE, requires_grad=True)
    width = dim + (num_sparse + 1) * num_sparse // 2
    read, written = 4 * batch * (num_sparse + 1) * dim, 4 * batch * width
    fused = lambda d, s: FusedDotInteraction.apply(d, s, False, None)
    compile_fn = compiled(dot_interaction_reference, use_compile)
    for backward in (False, True):
        work = read + written + (read + written + read if backward else 0)
        table.add("dot_interaction", backward, impls(dot_interaction_reference, fused, compile_fn, [dense, sparse],
                                                     backward), (work, "GB/s", HBM_GBS),
                  note=f"B={batch}, 27 vectors x 128, fp32, out width {width} (unpadded)")


def bench_mlp(table: Table, batch: int, name: str, sizes: list[int], last_activation: bool, use_compile: bool):
    weights = [(torch.randn(o, i, device=DEVICE) * i ** -0.5).requires_grad_() for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.zeros(o, device=DEVICE, requires_grad=True) for o in sizes[1:]]
    x = torch.randn(batch, sizes[0], device=DEVICE)
    n = len(weights)
    reference = lambda x, *p: fused_mlp_reference(x, list(p[:n]), list(p[n:]), last_activation)
    fused = lambda x, *p: FusedMLPFunction.apply(x, last_activation, 0.0, *p)
    flops = 2 * batch * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    grads = [torch.randn(batch, o, device=DEVICE) for o in sizes[1:]]
    plain = [w.detach() for w in weights]
    acts = [x] + [torch.randn(batch, o, device=DEVICE) for o in sizes[1:-1]]

    def bare_gemms(backward):
        def run():
            h = x
            for w in plain:
                h = h @ w.t()
            if backward:
                for i in reversed(range(n)):
                    grads[i].t() @ acts[i]
                    if i > 0:
                        grads[i] @ plain[i]
        return run

    compile_fn = compiled(reference, use_compile)
    for backward in (False, True):
        runs = impls(reference, fused, compile_fn, [x, *weights, *biases], backward)
        runs["bare_gemms"] = bare_gemms(backward)
        table.add(name, backward, runs, ((3 if backward else 1) * flops, "TFLOP/s", TF32_TFLOPS),
                  note=f"{'-'.join(map(str, sizes))}, B={batch}, fp32 with TF32 matmuls")


def bench_dropout(table: Table, batch: int, use_compile: bool) -> dict:
    width, p = 1024, 0.5
    h = torch.randn(batch, width, device=DEVICE, requires_grad=True)
    grad = torch.randn(batch, width, device=DEVICE)

    def eager(h):
        return F.dropout(F.relu(h), p, True)

    def reference_pass(fn, backward):
        def run():
            out = fn(h)
            if backward:
                (d_h,) = torch.autograd.grad(out, h, grad)
                d_h.sum(0)
        return run

    def fused_pass(backward):
        def run():
            out, bits = relu_dropout(h.detach(), p)
            if backward:
                relu_mask_backward(grad, bits, 1 / (1 - p))
        return run

    compile_fn = compiled(eager, use_compile)
    elements = batch * width
    for backward in (False, True):
        runs = {"eager": reference_pass(eager, backward), "fused": fused_pass(backward)}
        if compile_fn is not None:
            runs["compile"] = reference_pass(compile_fn, backward)
        work = 8 * elements + elements / 8 + (8 * elements + elements / 8 if backward else 0)
        table.add("relu_dropout_bitmask", backward, runs, (work, "GB/s", HBM_GBS),
                  note=f"[{batch}, {width}] fp32, p={p}; backward includes the bias-gradient column sums")
    _, bits = relu_dropout(h.detach(), p)
    bool_mask = torch.empty(batch, width, dtype=torch.bool, device=DEVICE)
    return {"bitmask_bytes": bits.numel() * bits.element_size(), "bool_mask_bytes": bool_mask.numel(),
            "ratio": bits.numel() * bits.element_size() / bool_mask.numel()}


def bench_cross(table: Table, batch: int, dim: int, use_compile: bool):
    x0 = torch.randn(batch, dim, device=DEVICE, requires_grad=True)
    xl = torch.randn(batch, dim, device=DEVICE, requires_grad=True)
    bias = torch.zeros(dim, device=DEVICE, requires_grad=True)
    for name, reference, fused, weight in (
            ("cross_v1", cross_v1_reference, FusedCrossV1.apply, torch.randn(dim, device=DEVICE) * dim ** -0.5),
            ("cross_v2", cross_v2_reference, FusedCrossV2.apply, torch.randn(dim, dim, device=DEVICE) * dim ** -0.5)):
        weight.requires_grad_()
        compile_fn = compiled(reference, use_compile)
        for backward in (False, True):
            work = 4 * batch * dim * (3 if not backward else 3 + 5)
            figure = (work, "GB/s", HBM_GBS) if name == "cross_v1" else None
            table.add(name, backward, impls(reference, fused, compile_fn, [x0, xl, weight, bias], backward), figure,
                      note=f"B={batch}, D={dim}, fp32")


def bench_gather(table: Table, batch: int, use_compile: bool):
    rows, dim, bag = 1 << 20 if CUDA else 1 << 10, 128, 26
    weights = torch.randn(rows, dim, device=DEVICE, requires_grad=True)
    idx = torch.randint(0, rows, (batch * bag,), device=DEVICE)
    bags = idx.view(batch, bag)
    moved = 4 * idx.numel() * dim
    compile_rows = compiled(gather_rows_reference, use_compile)
    compile_sum = compiled(gather_sum_reference, use_compile)
    for backward in (False, True):
        table.add("gather_rows", backward, impls(gather_rows_reference, GatherRows.apply, compile_rows,
                                                 [weights, idx], backward),
                  (2 * moved * (2 if backward else 1), "GB/s", HBM_GBS),
                  note=f"{batch * bag} random rows of {rows} x {dim} fp32; backward = per-row reduction")
        runs = impls(gather_sum_reference, GatherSum.apply, compile_sum, [weights, bags], backward)
        runs["embedding_bag"] = training_pass(lambda w, b: F.embedding_bag(b, w, mode="sum"), [weights, bags],
                                              backward)
        table.add("gather_sum", backward, runs, (moved * (2 if backward else 1), "GB/s", HBM_GBS),
                  note=f"{batch} bags of {bag}, sum pooling; embedding_bag also timed")
        to_bf16 = {"eager": training_pass(lambda w, i: GatherRows.apply(w, i).to(torch.bfloat16), [weights, idx],
                                          backward),
                   "fused": training_pass(lambda w, i: GatherRows.apply(w, i, torch.bfloat16), [weights, idx],
                                          backward)}
        table.add("gather_rows_to_bf16", backward, to_bf16,
                  note="fp32 rows handed to a bf16 dense part: fused = the gather writes bf16 (and reduces bf16 "
                       "gradients); eager column = the fp32 gather kernel, then .to(bf16)")


def dlrm_at_criteo_shapes(batch: int):
    """DLRM 13-512-256-128 / 480-1024-1024-512-256-1 over a DeviceStore (26 features x 128), SGD, and 4 batches."""
    from terarec.models import DLRM, Batch, DLRMConfig, Embedding, SparseDenseOptimizer
    from terarec.store import DeviceStore, SparseSGD

    torch.manual_seed(0)
    embedding = Embedding(DeviceStore(dim=128, optimizer=SparseSGD(lr=0.01), device=DEVICE,
                                      initial_capacity=1 << 21))
    model = DLRM(embedding, 13, 26, DLRMConfig(bottom_mlp=[512, 256], top_mlp=[1024, 1024, 512, 256])).to(DEVICE)
    optimizer = SparseDenseOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01))
    vocab = 40_000
    batches = [Batch(torch.randn(batch, 13, device=DEVICE), torch.randint(0, vocab, (batch, 26), device=DEVICE),
                     torch.randint(0, 2, (batch, 1), device=DEVICE).float()) for _ in range(4)]
    return model, optimizer, batches


def median_step_ms(model, optimizer, batches, steps: int, precision: str = "fp32") -> float:
    """Median time of a training step (forward, backward, sparse and dense updates) in `precision`, after warm-up."""
    device = next(model.parameters()).device

    def step(b):
        with matmul_precision(precision):
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision, device):
                logits = model(b).float()
            F.binary_cross_entropy_with_logits(logits, b.labels).backward()
            optimizer.step()

    for b in batches:
        step(b)
    upcoming = itertools.cycle(batches)
    return timing.median_ms(lambda: step(next(upcoming)), iters=steps, warmup=0)


def bench_dlrm_step(batch: int, steps: int) -> dict:
    model, optimizer, batches = dlrm_at_criteo_shapes(batch)

    def timed(fused: bool) -> float:
        os.environ["TERAREC_FUSED"] = "1" if fused else "0"
        return median_step_ms(model, optimizer, batches, steps)

    eager_ms, fused_ms = timed(False), timed(True)
    os.environ.pop("TERAREC_FUSED")
    with torch.no_grad():
        lookup_ms = median_ms(lambda: model.embedding(batches[0].sparse))
    return {"batch": batch, "eager_ms": round(eager_ms, 3), "fused_ms": round(fused_ms, 3),
            "embedding_lookup_fwd_ms": round(lookup_ms, 3),
            "speedup": round(eager_ms / fused_ms, 2), "samples_per_s_fused": round(batch / fused_ms * 1e3),
            "config": "DLRM 13-512-256-128 / 480-1024-1024-512-256-1, 26 features x 128, DeviceStore + SparseSGD, "
                      "fp32 with TF32 matmuls, median of steps"}


def bench_precision(batch: int, steps: int) -> dict:
    """The fused DLRM step in each `precision` (fp32 with TF32 off, tf32, bf16 autocast): ms and samples/s."""
    model, optimizer, batches = dlrm_at_criteo_shapes(batch)
    figures = {}
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")           # main() turns TF32 on for the kernel rows
    for precision in ("fp32", "tf32", "bf16"):
        step_ms = median_step_ms(model, optimizer, batches, steps, precision)
        figures[precision] = {"step_ms": round(step_ms, 3), "samples_per_s": round(batch / step_ms * 1e3)}
        print(f"DLRM step, {precision}: {figures[precision]}", flush=True)
    torch.set_float32_matmul_precision(before)
    return {"batch": batch, **figures,
            "config": "DLRM 13-512-256-128 / 480-1024-1024-512-256-1, 26 features x 128, DeviceStore + SparseSGD, "
                      "fused kernels, median of steps"}


def plot(rows: list[dict], path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{r['op']}\n{r['pass']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.7), 4))
    for k, impl in enumerate(("compile", "fused")):
        ax.bar([i + 0.4 * k for i in range(len(rows))], [r["ms"]["eager"] / r["ms"].get(impl, float("nan"))
                                                        for r in rows], width=0.4, label=impl)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + 0.2 for i in range(len(rows))], labels, fontsize=7, rotation=60)
    ax.set_ylabel("speedup over eager")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--commit", default=commit(), help="default: the checkout's (or TERAREC_COMMIT)")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--steps", type=int, default=20, help="timed DLRM training steps")
    parser.add_argument("--only", type=lambda v: v.split(","), default=list(GROUPS),
                        help=f"comma-separated groups to run, of {','.join(GROUPS)}; their rows replace those "
                             "in the existing results")
    args = parser.parse_args()
    unknown = set(args.only) - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown group(s) {', '.join(sorted(unknown))}; pick from {', '.join(GROUPS)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    batch = 256 if args.small else 65536
    use_compile = not args.no_compile
    device_name = torch.cuda.get_device_name() if CUDA else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    slug = device_name.lower().replace("nvidia ", "").replace(" ", "-")
    path = args.out / f"kernels-{slug}.json"
    today = datetime.date.today().isoformat()
    partial = set(args.only) != set(GROUPS)
    result = {"device": device_name, "date": today, "commit": args.commit,
              "torch": torch.__version__, "batch": batch, "settings": "fp32 tensors, TF32 matmuls on"}
    old_rows = []
    if partial and path.exists():
        previous = json.loads(path.read_text())
        old_rows = previous.pop("rows")
        result = {**previous, "remeasured": [*previous.get("remeasured", []), {
            "groups": args.only, "device": device_name, "date": today, "commit": args.commit,
            "torch": torch.__version__}]}

    table = Table()

    def rows() -> list[dict]:
        """The new rows, in the old rows' places where they replace them."""
        new = {(r["op"], r["pass"]): r for r in table.rows}
        merged = [new.pop((r["op"], r["pass"]), r) for r in old_rows]
        return merged + list(new.values())

    def save():
        path.write_text(json.dumps({**result, "rows": rows()}, indent=1))

    print(f"{'op':<22} {'pass':<8} {'eager':>9} {'compile':>9} {'fused':>9} {'bare':>9} {'speedup':>7}  figure")
    if "dlrm" in args.only:
        result["dlrm_step"] = bench_dlrm_step(batch, 3 if args.small else args.steps)
        print("DLRM training step:", result["dlrm_step"], flush=True)
        save()
    if "precision" in args.only:
        result["precision_step"] = bench_precision(batch, 3 if args.small else args.steps)
        save()
    if "interaction" in args.only:
        bench_interaction(table, batch, use_compile)
        save()
    if "mlp" in args.only:
        bench_mlp(table, batch, "bottom_mlp", [13, 512, 256, 128], True, use_compile)
        bench_mlp(table, batch, "top_mlp", [480, 1024, 1024, 512, 256, 1], False, use_compile)
        save()
    if "dropout" in args.only:
        result["dropout_mask_memory"] = bench_dropout(table, batch, use_compile)
        save()
    if "cross" in args.only:
        bench_cross(table, batch, 1024 if not args.small else 64, use_compile)
    if "gather" in args.only:
        bench_gather(table, batch, use_compile)
    save()
    all_rows = rows()
    final = Table()
    final.rows = all_rows
    lines = [f"Fused kernels vs PyTorch on {result['device']}, {result['date']} (commit {result['commit'][:10]}); "
             f"{result['settings']}; medians of triton.testing.do_bench."]
    for again in result.get("remeasured", []):
        lines.append(f"Re-measured on {again['device']}, {again['date']} (commit {again['commit'][:10]}, torch "
                     f"{again['torch']}): the {', '.join(again['groups'])} rows.")
    markdown = "\n".join(lines) + f"\n\n{final.markdown()}\n"
    if "dlrm_step" in result:
        step = result["dlrm_step"]
        markdown += (f"\nWhole DLRM training step (B={step['batch']}): eager {step['eager_ms']} ms, fused "
                     f"{step['fused_ms']} ms, {step['speedup']}× ({step['config']}).\n")
    if "precision_step" in result:
        step = result["precision_step"]
        markdown += (f"\nDLRM training step by `precision` (B={step['batch']}, {step['config']}): "
                     + ", ".join(f"{p} {step[p]['step_ms']} ms ({step[p]['samples_per_s']:,} samples/s)"
                                 for p in ("fp32", "tf32", "bf16")) + ".\n")
    if "dropout_mask_memory" in result:
        memory = result["dropout_mask_memory"]
        markdown += (f"\nDropout mask memory: bitmask {memory['bitmask_bytes']} B vs bool "
                     f"{memory['bool_mask_bytes']} B (ratio {memory['ratio']}).\n")
    (args.out / "kernels.md").write_text(markdown)
    plot(all_rows, args.out / "kernels.png")
    print(markdown)


if __name__ == "__main__":
    main()
