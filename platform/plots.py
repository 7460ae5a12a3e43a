"""Training curves as a picture: loss and samples/s per logged step, from RUN_DIR/curve.jsonl."""
from __future__ import annotations

import json
import os


def plot_curve(run_dir: str) -> str | None:
    """Write RUN_DIR/curve.png; returns its path, or None without matplotlib or a curve."""
    curve_path = os.path.join(run_dir, "curve.jsonl")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not os.path.isfile(curve_path):
        return None
    with open(curve_path) as stream:
        points = sorted((json.loads(line) for line in stream if line.strip()), key=lambda p: p["step"])
    if not points:
        return None
    steps = [p["step"] for p in points]
    figure, (loss_axis, speed_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(steps, [p["loss"] for p in points])
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
    speed_axis.plot(steps, [p["samples_per_s"] for p in points])
    speed_axis.set(xlabel="step", ylabel="samples/s", title="throughput")
    figure.tight_layout()
    out = os.path.join(run_dir, "curve.png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
