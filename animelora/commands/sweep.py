"""`animelora sweep`: train candidate recipes rung by rung, prune the clearly worse, name the best.

Exit codes: 0 the sweep is complete (report written); 3 stopped early and resumable
(``--stop-after`` or Ctrl-C / SIGTERM: re-run the same command to continue, finished
rungs are not trained again); 2 bad arguments, spec or data set, a sweep folder or run folder
that is not this sweep's, or the sweep running in another process; 1 runtime failure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lora.datapaths import DatasetPaths

from .paths import add_path

EXIT_COMPLETE = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3


def _workspace(args: argparse.Namespace) -> Path:
    """``--workspace``, else the workspace the data set lies in (``<ws>/datasets/<name>``)."""
    if args.workspace:
        return Path(args.workspace).expanduser().resolve()
    dataset = Path(args.dataset).expanduser().resolve()
    workspace = DatasetPaths(dataset).workspace
    if workspace is not None:
        return workspace
    raise ValueError(f"--dataset {args.dataset} is not in a workspace's datasets/ folder: "
                     "give --workspace (the sweep's run folders go to <workspace>/runs/)")


def _base(args: argparse.Namespace, file_base: dict[str, Any]) -> dict[str, Any]:
    from lora.sweep import pin_dataset_version
    from lora.sweep.spec import parse_value

    base: dict[str, Any] = dict(file_base)
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        base[key.strip().replace("-", "_")] = parse_value(raw)
    _check_setting_names(list(base))
    if args.model:
        base["model"] = args.model
    base["dataset"] = str(Path(args.dataset).expanduser().resolve())
    return pin_dataset_version(base)


def _rungs(args: argparse.Namespace, file_rungs: Any) -> list[int] | None:
    if args.compare_at is None:
        return list(file_rungs) if file_rungs is not None else None
    try:
        return [int(r) for r in args.compare_at.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--compare-at expects epochs such as 5,10, got {args.compare_at!r}") from None


def _check_setting_names(keys: list[str]) -> None:
    """An unknown setting named with what it was probably meant as (``lr`` -> learning_rate)."""
    from lora.config import setting_names

    from .settings import suggestions

    known = setting_names()
    for key in keys:
        if key not in known:
            close = suggestions(key, known)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"unknown setting {key!r}{hint}")


def build_spec_from_args(args: argparse.Namespace) -> Any:
    """The sweep's spec from ``--spec`` (if any) and the flags; the flags add to the file."""
    from lora.sweep import build_spec, parse_candidate, parse_grid_axis, read_spec_file

    data = read_spec_file(args.spec) if args.spec else {}
    grid = dict(data.get("grid") or {})
    grid.update(dict(parse_grid_axis(item) for item in args.grid or []))
    candidates = list(data.get("candidates") or []) + [parse_candidate(c) for c in args.candidate or []]
    _check_setting_names([*grid, *(k for c in candidates for k in c if k != "name")])
    return build_spec(args.name, preset=args.preset or data.get("preset"), base=_base(args, data.get("base") or {}),
                      grid=grid or None, candidates=candidates, rungs=_rungs(args, data.get("rungs")))


def _summary(result: Any) -> list[str]:
    data = result.to_dict()
    lines = []
    if result.status == "complete":
        lines.append(f"sweep {data['sweep']} complete: best {data.get('best') or '-'}"
                     + (" (distinguishably lower than every other)" if data.get("best_distinguishable")
                        else " (not distinguishable from the others in its group)" if data.get("best") else ""))
        for row in data.get("ranking", []):
            mean = f"{row['mean']:.5g}" if row.get("mean") is not None else "-"
            lines.append(f"  {row['candidate']}: {row['status']}, validation loss {mean}")
    else:
        lines.append(f"sweep {data['sweep']} stopped after {data['rungs_done']} of {data['rungs']} rungs; "
                     "re-run the same command to continue")
    lines.append(f"report: {data['report']}" + (f" (plot: {data['plot']})" if data.get("plot") else ""))
    return lines


def _handler(args: argparse.Namespace) -> int:
    from lora.config import ConfigError
    from lora.sweep import SweepInterrupted, run_sweep

    if args.stop_after is not None and args.stop_after < 1:
        print(f"error: --stop-after must be >= 1, got {args.stop_after}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        workspace = _workspace(args)
        spec = build_spec_from_args(args)
        result = run_sweep(spec, workspace, stop_after_rungs=args.stop_after)
    except SweepInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except (ConfigError, ValueError) as exc:  # spec, settings, state, busy sweep, data set
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    code = EXIT_COMPLETE if result.status == "complete" else EXIT_STOPPED
    if args.json:
        print(json.dumps({**result.to_dict(), "exit_code": code}, indent=2))
    else:
        print("\n".join(_summary(result)))
    return code


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sweep",
        help="train candidate recipes, prune the clearly worse at rungs, name the best "
             "(exit 0 complete, 3 stopped and resumable)",
        description="Train a list or grid of candidate recipes on one data-set version, each in its "
        "own run folder <workspace>/runs/<name>-<candidate>. At each rung (the end of an epoch) every "
        "live candidate is compared with the rung's best on the data set's held-out images, paired "
        "image by image with a 95% interval; a candidate clearly worse (interval above 0) stops, "
        "the others resume from their checkpoints, and the end names the best with its interval. "
        "Its state and report are in <workspace>/sweeps/<name>/; a stopped sweep continues where it "
        "stopped when the same command runs again. Exit codes: 0 complete, 3 stopped early "
        "(--stop-after, Ctrl-C or SIGTERM; re-run to continue), 2 bad input or the sweep busy "
        "in another process, 1 runtime failure.",
    )
    add_path(parser, "--dataset", role="dataset_dir", required=True,
             help="data-set folder (its latest version is pinned for the whole sweep)")
    add_path(parser, "--name", role="run_name", required=True,
             help="sweep name: its folder <workspace>/sweeps/<name>/ and the prefix of its run folders")
    add_path(parser, "--workspace", role="workspace", default=None,
             help="workspace of the run and sweep folders (default: the one the data set lies in)")
    add_path(parser, "--spec", role="input", default=None,
             help="JSON or TOML sweep file: preset, rungs, [base] settings, [grid] lists, "
                  "[[candidates]] (the flags below add to it)")
    parser.add_argument("--preset", default=None,
                        help="preset every candidate starts from (default phase2a; README: Presets)")
    add_path(parser, "--model", role="input", default=None,
             help="base model for every candidate: a Hub id, a diffusers folder, a .safetensors "
                  "checkpoint or 'tiny' (default stable-diffusion-v1-5/stable-diffusion-v1-5)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a training setting shared by every candidate, e.g. --set epochs=10 (repeatable)")
    parser.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                        help="vary a setting: every combination of the --grid values is a candidate, "
                             "e.g. --grid learning_rate=1e-4,5e-5 --grid lora_rank=8,16 (repeatable)")
    parser.add_argument("--candidate", action="append", metavar="'KEY=VALUE ...'",
                        help="one more candidate by its settings, e.g. --candidate 'learning_rate=1e-4 "
                             "lora_rank=8' (repeatable; name=NAME names it)")
    parser.add_argument("--compare-at", default=None, metavar="EPOCHS",
                        help="epochs at which to compare and prune before the end, e.g. 5,10 "
                             "(default: successive halving, a quarter and half of the longest run)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop once N rungs are done (exit 3); the same command continues later")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (best, ranking, groups, GPU time, report and plot paths) on stdout")
    parser.set_defaults(func=_handler)
