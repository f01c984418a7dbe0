"""`animelora dataset check | repair | remove | restore`: look after a data set edited by hand.

    animelora dataset check  --workspace ws --dataset anime        # exit 1 when something disagrees
    animelora dataset repair --workspace ws --dataset anime        # a new, consistent version
    animelora dataset remove --workspace ws --dataset anime 1234 local-ab12cd34 --reason blurry
    animelora dataset restore --workspace ws --dataset anime 1234

Registered by :mod:`animelora.commands.data` (fetch and import make the data sets these look
after). The work is in :mod:`lora.data.maintenance`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _print(result: Any, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(result.format_table())


def _run(args: argparse.Namespace) -> int:
    from lora.data.maintenance import (
        DatasetEditError,
        check_dataset,
        remove_images,
        repair_dataset,
        restore_images,
    )
    from lora.data.manifest import DatasetBusyError, DatasetPaths, ManifestError

    paths = DatasetPaths.of(args.workspace, args.dataset)
    try:
        if args.step == "check":
            report = check_dataset(paths)
            _print(report, args)
            return 0 if report.ok else 1
        if args.step == "repair":
            result = repair_dataset(paths)
        elif args.step == "remove":
            result = remove_images(paths, args.images, reason=args.reason)
        else:
            result = restore_images(paths, args.images)
    except (DatasetEditError, ManifestError, ValueError) as exc:
        return _error(str(exc), 2)
    except DatasetBusyError as exc:
        return _error(str(exc), 1)
    except OSError as exc:
        return _error(f"{type(exc).__name__}: {exc}", 1)
    _print(result, args)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .data import add_dataset_arguments

    parser = sub.add_parser(
        "dataset",
        help="check, repair, remove or restore images of a data set (after editing it by hand)",
        description="Look after a data set made by fetch or import. A version never lists a file "
        "that is not there; these commands find and record hand edits (a deleted image, an edited "
        "caption) and take images out or put them back, each change in a new version. Older "
        "versions are never rewritten.",
    )
    steps = parser.add_subparsers(dest="step", metavar="STEP", required=True,
                                  help="check, repair, remove or restore (each has --help)")
    helps = {
        "check": ("list what disagrees (a kept image whose file is gone, a caption edited by hand, "
                  "an unreadable or out-of-date latest version); writes nothing; exit 1 if anything"),
        "repair": ("record hand edits and write a new, consistent version: missing images are "
                   "marked removed (file-missing), edited captions taken into the manifest"),
        "remove": ("take images out: a new version without them; the manifest marks them removed, so "
                   "no fetch or import brings them back (their files stay for older versions)"),
        "restore": ("put removed images back (a new version); one whose file is gone comes back with "
                    "the next fetch of its query or import of its folder"),
    }
    for name, text in helps.items():
        step = steps.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_dataset_arguments(step)
        if name in ("remove", "restore"):
            step.add_argument("images", nargs="+", metavar="IMAGE",
                              help="an image's id (a Danbooru id, or local-... for imported files) or "
                                   "its file name (123.png, images/123.png)")
        if name == "remove":
            step.add_argument("--reason", default=None,
                              help="why, recorded in the manifest (removed-by-user:REASON)")
        step.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
        step.set_defaults(func=_run)
