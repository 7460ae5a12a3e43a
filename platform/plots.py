"""Training curves as a picture, from RUN_DIR/curve.jsonl: training loss and eval AUC against steps (the best
evaluation marked), and samples/s."""
from __future__ import annotations

import json
import os


def read_curve(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(training log lines, evaluation lines) of RUN_DIR/curve.jsonl, each sorted by step."""
    with open(os.path.join(run_dir, "curve.jsonl")) as stream:
        points = sorted((json.loads(line) for line in stream if line.strip()), key=lambda p: p["step"])
    return [p for p in points if "loss" in p], [p for p in points if "auc" in p]


def plot_curve(run_dir: str) -> str | None:
    """Write RUN_DIR/curve.png; returns its path, or None without matplotlib or a curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not os.path.isfile(os.path.join(run_dir, "curve.jsonl")):
        return None
    logs, evals = read_curve(run_dir)
    if not logs:
        return None
    steps = [p["step"] for p in logs]
    figure, (loss_axis, speed_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(steps, [p["loss"] for p in logs], label="train loss", color="tab:blue")
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss and eval AUC")
    if evals:
        auc_axis = loss_axis.twinx()
        auc_axis.plot([p["step"] for p in evals], [p["auc"] for p in evals], "o-", color="tab:orange", label="eval AUC")
        marked = [p for p in evals if p.get("is_best")]  # the tracker's choice (min_delta may pass a higher one)
        best = marked[-1] if marked else max(evals, key=lambda p: p["auc"])
        auc_axis.plot([best["step"]], [best["auc"]], "*", color="tab:red", markersize=14,
                      label=f"best {best['auc']:.4f} @ {best['step']}")
        auc_axis.set_ylabel("eval AUC")
        figure.legend(loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.27, 0.0))
    speed_axis.plot(steps, [p["samples_per_s"] for p in logs])
    speed_axis.set(xlabel="step", ylabel="samples/s", title="throughput")
    figure.tight_layout(rect=(0, 0.08 if evals else 0, 1, 1))
    out = os.path.join(run_dir, "curve.png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
