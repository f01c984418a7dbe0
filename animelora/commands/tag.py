"""`animelora tag DIR`: kohya ``.txt`` captions for images that have none, from a WD14 tagger.

    animelora tag old_downloads/                       # SmilingWolf/wd-swinv2-tagger-v3
    animelora tag old_downloads/ --model ./wd-tagger --general-threshold 0.4
    animelora import --from old_downloads/ ...          # then picks the captions up

The tagger (onnxruntime) is an optional extra: ``pip install 'animelora[tagger]'``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .paths import add_path

# Shown in --help without importing the tagger (lora.data.tagger's constants, which the
# handler uses; tests/cli/test_tag.py checks that they agree).
_DEFAULT_MODEL_HELP = "SmilingWolf/wd-swinv2-tagger-v3"
_GENERAL_HELP = 0.35
_CHARACTER_HELP = 0.85


def _error(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _tag(args: argparse.Namespace) -> int:
    from lora.data.captions import CaptionOptions
    from lora.data.tagger import Tagger, TaggerDownloadError, TaggerError, TaggerUnavailable, tag_folder

    from .progress import CountProgress

    folder = Path(args.folder)
    if not folder.is_dir():
        return _error(f"{folder}: not a folder", 2)
    blacklist = tuple(t.strip() for t in (args.blacklist or "").split(",") if t.strip())
    try:
        caption = CaptionOptions(blacklist=blacklist, max_tags=args.max_tags)
    except ValueError as exc:
        return _error(str(exc), 2)
    progress = CountProgress("tagging", quiet=getattr(args, "quiet", False))
    try:
        tagger = Tagger(args.model, general_threshold=args.general_threshold,
                        character_threshold=args.character_threshold, batch_size=args.batch_size)
        summary = tag_folder(folder, tagger, overwrite=args.overwrite, caption=caption,
                             on_progress=progress)
    except (TaggerUnavailable, TaggerDownloadError) as exc:  # runtime: the command itself was right
        return _error(str(exc), 1)
    except TaggerError as exc:
        return _error(str(exc), 2)
    except OSError as exc:
        return _error(f"{type(exc).__name__}: {exc}", 1)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(summary.describe(folder))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "tag",
        help="write kohya .txt captions for untagged images with a WD14 tagger (before import)",
        description="Tag every image under FOLDER that has no .txt caption with a WD14-style ONNX "
        "tagger (SmilingWolf's wd-*-tagger models: model.onnx + selected_tags.csv) and write "
        "<image>.txt beside it, in the caption rules of Danbooru tags (count tags, characters, "
        "then general tags; underscores as spaces). Existing captions are kept unless "
        "--overwrite. 'animelora import --from FOLDER' then reads them. Needs the tagger extra: "
        "pip install 'animelora[tagger]'.",
    )
    add_path(parser, "folder", role="input", metavar="FOLDER", help="folder of images (searched recursively, "
                        "hidden names skipped, symlinks out of it refused, as import does)")
    add_path(parser, "--model", role="input", default=_DEFAULT_MODEL_HELP,
                        help=f"a Hub repo id (default {_DEFAULT_MODEL_HELP}, downloaded once into "
                             "the Hugging Face cache) or a local folder with model.onnx and "
                             "selected_tags.csv")
    parser.add_argument("--general-threshold", type=float, default=_GENERAL_HELP,
                        help=f"lowest probability of a general tag to write (default {_GENERAL_HELP})")
    parser.add_argument("--character-threshold", type=float, default=_CHARACTER_HELP,
                        help=f"lowest probability of a character tag to write (default {_CHARACTER_HELP})")
    parser.add_argument("--blacklist", default=None, help="comma-separated tags to leave out")
    parser.add_argument("--max-tags", type=int, default=None, help="at most this many tags per caption")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per model call (default 8; a model with a fixed batch uses its own)")
    parser.add_argument("--overwrite", action="store_true",
                        help="also replace existing .txt captions (default: never touched)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (tagged, kept, no_tags, unreadable, files) on stdout")
    parser.set_defaults(func=_tag)
