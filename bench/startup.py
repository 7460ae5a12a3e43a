"""Where the time from `terarec train` to its first step goes: each start-up cost alone, in a fresh process.

One run measures, each in its own new Python process (so nothing is already imported or started):
imports (torch, Ray, Ray Train, terarec's training loop), the CUDA context, `ray.init` with and without the
dashboard, Ray Train's TorchTrainer from fit() to the first line of a loop that only imports torch (with and
without a GPU), and `terarec train` itself on tiny data (metrics.json's startup_s split), twice: the second run
finds the compile caches warm, as a user's second run does. Writes bench/results/startup-<device>.json.

    python bench/startup.py              # about 2 minutes
    python bench/startup.py --repeat 2   # each probe twice (the first may pay for .pyc compilation)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from results import device_name, record  # bench/results.py

PROBES = {
    "import_torch": "import torch",
    "import_ray": "import ray",
    "import_ray_train_torch": "import ray.train.torch",
    "import_train_loop": "import terarec.actors.train_worker",
    "cuda_context": "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()",
    "ray_init_dashboard": "import ray; ray.init(include_dashboard=True, dashboard_host='127.0.0.1')",
    "ray_init_no_dashboard": "import ray; ray.init(include_dashboard=False)",
}

# fit() to the loop's first line; the loop imports torch as terarec's does. Prints the seconds.
TRAINER = """
import time, ray
from ray.train import ScalingConfig, RunConfig
from ray.train.torch import TorchTrainer, TorchConfig
ray.init(include_dashboard={dashboard})
def loop(config):
    import time, torch
    open("{storage}/loop_at", "w").write(repr(time.time()))
trainer = TorchTrainer(loop, torch_config=TorchConfig(backend="gloo"),
                       scaling_config=ScalingConfig(num_workers=1, use_gpu={gpu}),
                       run_config=RunConfig(storage_path="{storage}"))
started = time.time()
result = trainer.fit()
print("FIT_TO_LOOP", float(open("{storage}/loop_at").read()) - started, "FIT_TOTAL", time.time() - started)
"""


TERAREC = [sys.executable, "-c", "import sys; from terarec.platform.cli import main; sys.exit(main())"]


def timed(code: str, env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"probe failed: {code[:60]}...: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - started, done.stdout


def terarec_startup(data: str, run_dir: str, gpu: bool) -> dict:
    command = [*TERAREC, "train", "--data", data, "--run-dir", run_dir, "--set", "steps=5", "--set", "log_every=5",
               "--set", "eval_rows=1024"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    with open(os.path.join(run_dir, "metrics.json")) as stream:
        metrics = json.load(stream)
    return {"wall_s": time.perf_counter() - started, "first_step_s": metrics.get("time_to_first_step_s"),
            **{f"startup_{k}_s": v for k, v in (metrics.get("startup_s") or {}).items()}, "use_gpu": metrics.get("use_gpu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    figures: dict = {"probes_s": {}, "trainer": [], "terarec_train": []}
    env_quiet = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    for name, code in PROBES.items():
        if name == "cuda_context" and not gpu:
            continue
        figures["probes_s"][name] = [round(timed(code, env_quiet)[0], 2) for _ in range(args.repeat)]
        print(f"{name:28s} {figures['probes_s'][name]}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for dashboard in (True, False):
            for use_gpu in sorted({False, gpu}):
                total, out = timed(TRAINER.format(dashboard=dashboard, gpu=use_gpu, storage=scratch), env_quiet)
                words = out.split()
                row = {"dashboard": dashboard, "use_gpu": use_gpu, "process_s": round(total, 2),
                       "fit_to_loop_s": round(float(words[words.index("FIT_TO_LOOP") + 1]), 2),
                       "fit_total_s": round(float(words[words.index("FIT_TOTAL") + 1]), 2)}
                figures["trainer"].append(row)
                print(row, flush=True)
        data = os.path.join(scratch, "data")
        subprocess.run([*TERAREC, "data", "synth", "--out", data, "--rows", "20000", "--seed", "1"], check=True,
                       capture_output=True)
        for attempt in range(2):
            row = terarec_startup(data, os.path.join(scratch, f"run{attempt}"), gpu)
            figures["terarec_train"].append(row)
            print(row, flush=True)
    record(f"startup-{'h200' if 'H200' in device_name() else 'cpu'}", figures, {"repeat": args.repeat})


if __name__ == "__main__":
    main()
