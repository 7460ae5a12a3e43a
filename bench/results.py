"""Writes a benchmark's figures with the device, date and commit to bench/results/NAME.json."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug() -> str:
    """The device in a file name: `h200` for an NVIDIA H200, `cpu` without a GPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "-")
    return "cpu"


def commit() -> str:
    """The checkout's commit; TERAREC_COMMIT names it where the tree travels without .git (the GPU machine)."""
    if os.environ.get("TERAREC_COMMIT"):
        return os.environ["TERAREC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(RESULTS)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def record(name: str, figures: dict, settings: dict | None = None) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as stream:
        json.dump({"benchmark": name, "device": device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "commit": commit(), "torch": torch.__version__, "settings": settings or {}, "figures": figures},
                  stream, indent=1)
    print(f"wrote {path}")
    return path
