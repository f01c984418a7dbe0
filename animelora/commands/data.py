"""`animelora fetch` and `animelora import`: build and grow a versioned data set.

    animelora fetch --tags "1girl solo" --limit 100 --workspace workspace --dataset anime
    animelora fetch --query sketch_aesthetic=sketch --query soft_focus_landscape=landscape ...
    animelora import --from old_downloads/ --workspace workspace --dataset anime
    animelora dataset check --workspace workspace --dataset anime   (also repair, remove, restore)

Danbooru credentials come only from DANBOORU_LOGIN / DANBOORU_API_KEY, never from arguments
(they would end up in shell history and process lists).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from .paths import add_path

__all__ = ["register"]

_RATINGS = {"g", "s", "q", "e", "general", "sensitive", "safe", "questionable", "explicit"}
#: Shown in --help without importing the fetch pipeline (lora.data.refresh.DEFAULT_BOORU_URL,
#: which the handler uses); building the CLI must stay fast.
_BOORU_URL_HELP = "https://danbooru.donmai.us"
#: likewise lora.data.images.DEFAULT_MAX_PIXELS and lora.data.collect.DEFAULT_MAX_FILE_SIZE
#: (tests/datapipe/test_datapipe_cli.py checks that they agree)
_MAX_PIXELS_HELP = 150_000_000
_MAX_FILE_SIZE_HELP = 50 * 2**20


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _progress_bar(desc: str, quiet: bool = False) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    """Progress fed by ``on_progress`` events: a bar on a terminal, plain lines elsewhere."""
    from .progress import CountProgress

    progress = CountProgress(desc, quiet=quiet)
    return progress, progress.close


def _caption_options(args: argparse.Namespace):
    from lora.data.captions import CaptionOptions

    return CaptionOptions(
        trigger_word=args.trigger_word,
        include_artist=args.include_artist,
        blacklist=tuple(_csv(args.blacklist)),
        max_tags=args.max_tags,
    )


def _check_common(args: argparse.Namespace) -> str | None:
    if args.min_side < 64:
        return f"--min-side must be at least 64, got {args.min_side}"
    if not 0 <= args.radius <= 16:
        return f"--radius must be between 0 and 16, got {args.radius}"
    if args.max_tags is not None and args.max_tags < 0:
        return f"--max-tags must be >= 0, got {args.max_tags}"
    if not args.max_megapixels > 0:
        return f"--max-megapixels must be positive, got {args.max_megapixels:g}"
    return None


def _fetch(args: argparse.Namespace) -> int:
    from lora.booru import BooruAuthError, BooruError, BooruQueryError, Credentials, normalize_host
    from lora.data.manifest import DatasetBusyError, ManifestError
    from lora.data.refresh import DEFAULT_BOORU_URL, make_query_specs, refresh_dataset

    problem = _check_common(args)
    ratings = _csv(args.ratings)
    bad = [r for r in ratings if r.lower() not in _RATINGS]
    if problem is None and bad:
        problem = f"--ratings: unknown rating(s) {', '.join(bad)}; use g, s, q, e"
    if problem is None and not 0 < args.requests_per_second <= 10:
        problem = f"--requests-per-second must be in (0, 10], got {args.requests_per_second}"
    if problem is None and args.limit is not None and args.limit < 0:
        problem = f"--limit must be >= 0, got {args.limit}"
    if problem is None and args.target_size is not None and args.target_size < 1:
        problem = f"--target-size must be >= 1, got {args.target_size}"
    if problem is None and not args.max_file_mb > 0:
        problem = f"--max-file-mb must be positive, got {args.max_file_mb:g}"
    if problem is None and args.file_timeout is not None and not args.file_timeout > 0:
        problem = f"--file-timeout must be positive seconds, got {args.file_timeout:g}"
    hosts: list[str] = []
    for host in args.allow_file_host:
        if problem is None:
            try:
                hosts.append(normalize_host(host))
            except ValueError as exc:
                problem = f"--allow-file-host: {exc}"
    if problem:
        return _error(problem, 2)
    limit = args.limit
    if limit is None and args.target_size is None:
        limit = 100
    try:
        # --tags is the query named "default"; --query adds named ones beside it.
        raw = ([f"default={args.tags}"] if args.tags and args.tags.strip() else []) + list(args.query)
        if not raw:
            return _error("give --tags or at least one --query NAME=TAGS", 2)
        specs = make_query_specs(None, raw)
        credentials = Credentials.from_env()
        caption = _caption_options(args)
    except BooruAuthError as exc:
        return _error(str(exc), 2)
    except ValueError as exc:
        return _error(str(exc), 2)

    on_progress, close = _progress_bar("downloading", getattr(args, "quiet", False))
    try:
        summary = refresh_dataset(
            args.workspace, args.dataset, specs,
            booru_url=args.booru_url or DEFAULT_BOORU_URL, credentials=credentials, target_size=args.target_size,
            limit=limit, ratings=ratings, min_side=args.min_side, caption=caption,
            radius=args.radius, group_parents=args.group_parents,
            requests_per_second=args.requests_per_second, on_progress=on_progress,
            allow_file_hosts=hosts, max_file_size=int(args.max_file_mb * 1024 * 1024),
            max_pixels=int(args.max_megapixels * 1_000_000), file_timeout_s=args.file_timeout,
        )
    except (BooruQueryError, BooruAuthError) as exc:
        return _error(str(exc), 2)
    except DatasetBusyError as exc:
        return _error(str(exc), 1)
    except BooruError as exc:
        return _error(f"{type(exc).__name__}: {exc}", 1)
    except (ManifestError, ValueError) as exc:
        return _error(str(exc), 2)
    except OSError as exc:
        return _error(f"{type(exc).__name__}: {exc}", 1)
    finally:
        close()
    _report(summary, args)
    return 0


def _report(summary: Any, args: argparse.Namespace) -> None:
    """The summary table for people, or with --json one object (counts, version, reasons)."""
    if getattr(args, "json", False):
        print(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
    else:
        print(summary.format_table())


def _import(args: argparse.Namespace) -> int:
    from lora.data.importer import FolderImportError, import_folder
    from lora.data.manifest import DatasetBusyError, ManifestError

    problem = _check_common(args)
    if problem:
        return _error(problem, 2)
    on_progress, close = _progress_bar("importing", getattr(args, "quiet", False))
    try:
        summary = import_folder(
            args.workspace, args.dataset, args.source, query=args.query,
            caption=_caption_options(args), min_side=args.min_side, radius=args.radius,
            max_pixels=int(args.max_megapixels * 1_000_000), follow_symlinks=args.follow_symlinks,
            on_progress=on_progress,
        )
    except (FolderImportError, ManifestError, ValueError) as exc:
        return _error(str(exc), 2)
    except DatasetBusyError as exc:
        return _error(str(exc), 1)
    except OSError as exc:
        return _error(f"{type(exc).__name__}: {exc}", 1)
    finally:
        close()
    _report(summary, args)
    return 0


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workspace`` and ``--dataset``, the same for every command that writes a data set."""
    add_path(parser, "--workspace", role="workspace", default="workspace", help="workspace folder (default: ./workspace)")
    add_path(parser, "--dataset", role="dataset_name", default="anime", help="data set name (default: anime)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--min-side", type=int, default=512,
                        help="drop images whose short side is under this (default 512; never upscaled)")
    parser.add_argument("--trigger-word", default=None, help="written first in every caption")
    parser.add_argument("--include-artist", action="store_true", help="keep artist tags in captions")
    parser.add_argument("--blacklist", default=None, help="comma-separated tags to leave out of captions")
    parser.add_argument("--max-tags", type=int, default=None, help="at most this many tags per caption")
    parser.add_argument("--radius", type=int, default=4,
                        help="phash Hamming radius for near-duplicates (default 4)")
    parser.add_argument("--max-megapixels", type=float, default=_MAX_PIXELS_HELP / 1e6,
                        help=f"refuse images over this many megapixels as decompression bombs "
                        f"(default {_MAX_PIXELS_HELP / 1e6:g}; an 8000x8000 image is 64)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (kept, duplicates, rejected, reasons, version, "
                             "total) on stdout instead of the table; progress stays on stderr")


def register(sub: argparse._SubParsersAction) -> None:
    fetch = sub.add_parser(
        "fetch",
        help="fetch, dedup, caption and prepare Danbooru posts into a versioned data set",
        description="Fetch new posts for each query (newer than the saved cursor, then older until "
        "--limit / --target-size), skip deleted/banned/video posts and duplicates, caption and "
        "prepare the images, and write a new data-set version. Re-running continues from the "
        "cursor. Credentials: DANBOORU_LOGIN and DANBOORU_API_KEY in the environment.",
    )
    fetch.add_argument("--booru-url", default=None,
                       help=f"Danbooru (or a compatible server) base URL (default {_BOORU_URL_HELP})")
    fetch.add_argument("--tags", default=None, help='Danbooru tags, e.g. "1girl solo" (query "default")')
    fetch.add_argument("--query", action="append", default=[], metavar="NAME[:LIMIT]=TAGS",
                       help="a named query (repeatable), e.g. sketch_aesthetic=sketch")
    fetch.add_argument("--limit", type=int, default=None,
                       help="per query and run, take at most this many new posts as download "
                            "candidates (default 100 unless --target-size). Posts skipped from "
                            "their metadata (deleted, too small, byte-identical) do not count; "
                            "images dropped after download (near-duplicates, unreadable) do, so "
                            "fewer images may be added. For a number of images use --target-size")
    fetch.add_argument("--target-size", type=int, default=None,
                       help="grow the data set until it holds this many images (walks older posts)")
    fetch.add_argument("--ratings", default="g,s", help="comma-separated ratings (default g,s)")
    fetch.add_argument("--requests-per-second", type=float, default=1.0,
                       help="API request rate (default 1, at most 10)")
    fetch.add_argument("--group-parents", action="store_true",
                       help="treat posts of one parent/child group as duplicates")
    fetch.add_argument("--allow-file-host", action="append", default=[], metavar="HOST",
                       help="also download files from HOST (repeatable; *.example.com allowed). "
                       "Without it, files come only from the booru's own host and its known CDN "
                       "(cdn.donmai.us for Danbooru)")
    fetch.add_argument("--max-file-mb", type=float, default=_MAX_FILE_SIZE_HELP / 2**20,
                       help=f"largest file to download, in MiB (default {_MAX_FILE_SIZE_HELP / 2**20:g}); "
                       "a download also stops just past the post's declared size")
    fetch.add_argument("--file-timeout", type=float, default=None, metavar="SECONDS",
                       help="most time one file's download may take, retries included (default: "
                       "max(60, its size at 64 KiB/s)); a file over it, or one slower than 1 KiB/s "
                       "for 30 s, is recorded as failed and tried again by the next fetch")
    _add_common(fetch)
    fetch.set_defaults(func=_fetch)

    imp = sub.add_parser(
        "import",
        help="import a local folder (plain images or the old downloader's layout) into a data set",
        description="Import images from a folder through the same dedup, caption and prepare steps "
        "as a fetch. Plain images use their .txt captions when present; the old downloader's "
        "layout (<style>/<file>.png + metadata.json) maps style to query and tags to captions. "
        "Hidden files are skipped and symlinks out of the folder refused (both are reported); "
        "a folder inside the data set itself is refused.",
    )
    add_path(imp, "--from", role="input", dest="source", required=True, help="folder to import")
    imp.add_argument("--query", default=None, help="query name recorded for plain images (default: import)")
    imp.add_argument("--follow-symlinks", action="store_true",
                     help="also import files and folders that symlinks lead to outside the source "
                     "folder (refused by default)")
    _add_common(imp)
    imp.set_defaults(func=_import)

    from .dataset import register as register_dataset  # check/repair/remove/restore of what these make

    register_dataset(sub)
