"""Benchmark: the host part of a training step, one process alone vs. processes side by side.

A step's host work on a GPU run is drawing the next step's noise and stacking the cached
latents and text (lora/train/step/inputs.py ``StepInputs.build``, here on the CPU without the
copy). With torch's default of one CPU thread per core, processes side by side wait on each
other's spinning OpenMP threads; the trainer therefore uses one thread on a GPU
(lora/train/run/host.py). This prints the time of that host work per step (mean, median and
90th percentile of the slowest process) for both settings, alone and with ``--processes``
copies running at once.

    python bench/host_threads.py [--batch 32] [--processes 2] [--seconds 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def host_step_ms(batch: int, seconds: float, limit: bool) -> dict:
    """Median and 90th percentile of one step's host work, repeated for ``seconds``."""
    import torch

    from lora.train.run.host import host_threads_for
    from lora.train.step.inputs import draw_step

    shapes = [torch.Size((4, 64, 64))] * batch
    latents = [torch.randn(4, 64, 64) for _ in range(batch)]
    text = [torch.randn(77, 768) for _ in range(batch)]
    times = []
    with host_threads_for(limit) as threads:
        end = time.monotonic() + seconds
        step = 0
        while time.monotonic() < end:
            step += 1
            t = time.perf_counter()
            draws = draw_step(0, step, shapes, num_train_timesteps=1000, noise_offset=0.05, flip=True)
            torch.stack(latents), torch.stack(draws.noise), torch.stack(text)
            times.append(time.perf_counter() - t)
    times.sort()
    return dict(threads=threads, mean_ms=statistics.fmean(times) * 1e3, median_ms=statistics.median(times) * 1e3,
                p90_ms=times[int(len(times) * 0.9)] * 1e3, steps=len(times))


def side_by_side(n: int, batch: int, seconds: float, limit: bool) -> list[dict]:
    """``n`` copies of the child measurement started together; their results."""
    cmd = [sys.executable, __file__, "--child", "--batch", str(batch), "--seconds", str(seconds)]
    if limit:
        cmd.append("--limit")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--limit", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(host_step_ms(a.batch, a.seconds, a.limit)), flush=True)
        return 0
    rows = []
    for limit, label in ((False, "torch default threads"), (True, "trainer on a GPU (lora/train/run/host.py)")):
        for n in (1, a.processes):
            results = side_by_side(n, a.batch, a.seconds, limit)
            worst = max(results, key=lambda r: r["mean_ms"])  # a step waits for its slowest part
            rows.append((label, worst["threads"], n, worst["mean_ms"], worst["median_ms"], worst["p90_ms"]))
    print(f"host work of one batch-{a.batch} step (noise draws + stacking), {os.cpu_count()} CPUs")
    print(f"{'setting':40s} {'threads':>7s} {'processes':>9s} {'mean ms':>8s} {'median ms':>10s} {'p90 ms':>8s}")
    for label, threads, n, mean, med, p90 in rows:
        print(f"{label:40s} {threads:>7d} {n:>9d} {mean:8.2f} {med:10.2f} {p90:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
