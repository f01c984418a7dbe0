"""One training segment on several GPUs of this host, as a child process group.

Why a separate entry point: data parallelism needs one process per GPU, started by torchrun
(what ``accelerate launch`` runs underneath), so a caller that lives in one process (a Prefect
worker) cannot call :func:`lora.train.train` itself. :func:`run_segment_processes` starts

    python -m torch.distributed.run --standalone --nproc_per_node N -m lora.train.launch ...

waits for it and returns the segment's outcome, read from a result file the main process
writes. Every process exits 0 for "complete" and "stopped at the step target / time budget /
on a signal" alike (torchrun reports any other status as a failure), 2 for a bad config.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from lora.config import ConfigError, TrainConfig
from lora.fsutil import atomic_write_text
from lora.train.data.dataset import DatasetError
from lora.train.distributed import close_process_group, is_main_launched_process
from lora.train.errors import one_line
from lora.train.run.loop import TrainResult
from lora.train.run.start import train

EXIT_BAD_CONFIG = 2
#: marks the one-line error a child prints, so the parent can repeat it
ERROR_PREFIX = "animelora-segment-error:"


class SegmentLaunchError(RuntimeError):
    """The process group failed (a crash, a lost GPU): a retry resumes from the checkpoint."""


@dataclass
class SegmentOutcome:
    """What a segment reports, in one process or several (JSON-able: the task returns it)."""

    global_step: int
    total_steps: int
    complete: bool
    stopped_reason: str
    lora_files: list[str]

    @classmethod
    def from_result(cls, result: TrainResult) -> "SegmentOutcome":
        return cls(result.global_step, result.total_steps, result.complete, result.stopped_reason,
                   [str(p) for p in result.lora_files])


def launch_command(config_file: Path, run_dir: Path, result_file: Path, processes: int,
                   stop_at_step: int | None, time_budget_s: float | None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "lora.train.launch", "--config-json", str(config_file), "--run-dir", str(run_dir),
           "--result", str(result_file)]
    if stop_at_step is not None:
        cmd += ["--stop-at-step", str(stop_at_step)]
    if time_budget_s is not None:
        cmd += ["--time-budget-s", str(time_budget_s)]
    return cmd


def run_segment_processes(cfg: TrainConfig, run_dir: Path, processes: int, *, stop_at_step: int | None = None,
                          time_budget_s: float | None = None, env: dict[str, str] | None = None) -> SegmentOutcome:
    """Train one segment in ``processes`` processes (one per visible GPU) and wait for it.

    Raises :class:`~lora.config.ConfigError` for a bad config (retrying cannot help) and
    :class:`SegmentLaunchError` for anything else, with the children's last error line.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".segment-", dir=run_dir) as tmp:
        config_file, result_file = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_file.write_text(json.dumps(cfg.model_dump(mode="json")), encoding="utf-8")
        cmd = launch_command(config_file, run_dir, result_file, processes, stop_at_step, time_budget_s)
        child_env = dict(os.environ if env is None else env)
        repo = str(Path(__file__).resolve().parents[2])  # the children import lora from here too
        child_env["PYTHONPATH"] = repo + os.pathsep + child_env.get("PYTHONPATH", "")
        proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True)
        errors = [line.split(ERROR_PREFIX, 1)[1].strip() for line in (proc.stdout + proc.stderr).splitlines()
                  if ERROR_PREFIX in line]
        if proc.returncode == 0 and result_file.is_file():
            return SegmentOutcome(**json.loads(result_file.read_text(encoding="utf-8")))
        if any(e.startswith("config:") for e in errors):
            raise ConfigError(next(e for e in errors if e.startswith("config:"))[len("config:"):].strip())
        detail = errors[0] if errors else " ".join((proc.stderr or proc.stdout).split())[-600:]
        raise SegmentLaunchError(f"{processes}-process training segment failed (exit {proc.returncode}): {detail}")


def main(argv: list[str] | None = None) -> int:
    """The child side: every process trains its share; the main process writes the result file."""
    ap = argparse.ArgumentParser(prog="python -m lora.train.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-json", required=True, help="a TrainConfig as JSON (all fields)")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--result", required=True, help="where the main process writes the outcome")
    ap.add_argument("--stop-at-step", type=int, default=None)
    ap.add_argument("--time-budget-s", type=float, default=None)
    a = ap.parse_args(argv)
    try:
        cfg = TrainConfig(**json.loads(Path(a.config_json).read_text(encoding="utf-8")))
        result = train(cfg, Path(a.run_dir), stop_at_step=a.stop_at_step, time_budget_s=a.time_budget_s)
    except (ConfigError, DatasetError, ValueError) as exc:
        print(f"{ERROR_PREFIX} config: {one_line(exc, None)}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    except Exception as exc:  # noqa: BLE001 - one line for the parent, then the traceback
        print(f"{ERROR_PREFIX} {type(exc).__name__}: {one_line(exc, 400)}", file=sys.stderr,
              flush=True)
        raise
    if is_main_launched_process():
        atomic_write_text(Path(a.result), json.dumps(asdict(SegmentOutcome.from_result(result))))
    close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
