"""Tags for images that have none: a WD14-style ONNX tagger (SmilingWolf's ``wd-*-tagger``).

Why: a folder of images without ``.txt`` captions imports as uncaptioned images, and a LoRA
learns little from them. kohya and OneTrainer users tag such folders with the WD14 taggers;
this does the same and writes kohya ``.txt`` captions beside the images, under the caption
rules Danbooru tags follow here (lora/data/captions.py: counts, characters, general tags,
underscores as spaces, meta tags dropped), so ``animelora import`` then reads them as it reads
any caption.

The model is a folder (or Hub repo, as SmilingWolf's repos lay it out) holding ``model.onnx``
and ``selected_tags.csv`` (``tag_id,name,category,count``; category 9 = rating, 4 = character,
0 = general). The model takes ``N x H x W x 3`` float32 pixels in BGR order, 0-255, the image
padded to a white square and resized to the model's side, and gives one probability per row of
the CSV. onnxruntime is an optional extra (``pip install 'animelora[tagger]'``), imported only
when a tagger is built.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from lora.data.captions import CaptionOptions, TagSet, build_caption, write_caption

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_GENERAL_THRESHOLD", "DEFAULT_CHARACTER_THRESHOLD", "MODEL_FILE",
    "TAGS_FILE", "TaggerError", "TaggerUnavailable", "TaggerDownloadError", "TagRow", "Tagger", "TagSummary",
    "read_tag_rows", "resolve_model", "preprocess", "tag_folder",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmilingWolf/wd-swinv2-tagger-v3"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
#: The thresholds kohya's tag_images_by_wd14_tagger.py and the WD14 web UI extension start from.
DEFAULT_GENERAL_THRESHOLD = 0.35
DEFAULT_CHARACTER_THRESHOLD = 0.85
GENERAL, CHARACTER, RATING = 0, 4, 9
#: The side of SmilingWolf's models, used when a model does not say its own.
DEFAULT_SIDE = 448
WHITE = (255, 255, 255)
EXTRA_HINT = "pip install 'animelora[tagger]' (onnxruntime)"


class TaggerError(ValueError):
    """A model that cannot be used (missing files, a malformed CSV, an unreadable ONNX file)."""


class TaggerUnavailable(TaggerError):
    """onnxruntime is not installed: the message names the extra that brings it."""


class TaggerDownloadError(TaggerError):
    """The Hub could not be reached (offline, a server error): a runtime failure, not bad input."""


@dataclass(frozen=True)
class TagRow:
    """One row of ``selected_tags.csv``: Danbooru spelling (underscores) and its category."""

    name: str
    category: int


def read_tag_rows(path: Path) -> list[TagRow]:
    """The tag rows, in the order of the model's outputs; :class:`TaggerError` on a bad file."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise TaggerError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TaggerError(f"{path}: not a UTF-8 CSV ({exc})") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise TaggerError(f"{path}: expected the header tag_id,name,category,count "
                          f"(SmilingWolf's selected_tags.csv), got {','.join(rows[0]) if rows else 'an empty file'}")
    tags = []
    for number, row in enumerate(rows[1:], start=2):
        try:
            tags.append(TagRow(row[1].strip(), int(row[2])))
        except (IndexError, ValueError):
            raise TaggerError(f"{path}: line {number} is not tag_id,name,category,count") from None
    if not tags:
        raise TaggerError(f"{path}: no tags")
    return tags


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def resolve_model(model: str | Path, *, revision: str | None = None) -> tuple[Path, Path]:
    """``(model.onnx, selected_tags.csv)`` from a local folder, or downloaded (and cached by
    huggingface_hub, ``HF_HOME``) from a Hub repo id such as ``SmilingWolf/wd-swinv2-tagger-v3``."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        files = folder / MODEL_FILE, folder / TAGS_FILE
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise TaggerError(f"{folder}: no {' or '.join(missing)} (a tagger folder holds "
                              f"{MODEL_FILE} and {TAGS_FILE})")
        return files
    if folder.exists() or not _looks_like_hub_id(str(model)):
        raise TaggerError(f"--model {model}: not a folder with {MODEL_FILE} and {TAGS_FILE}, "
                          "nor a Hub repo id (owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        return tuple(Path(hf_hub_download(str(model), name, revision=revision))  # type: ignore[return-value]
                     for name in (MODEL_FILE, TAGS_FILE))
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as exc:
        # no such repo or file: the id is wrong (exit 2); anything else: the Hub was not reached
        wrong_id = (isinstance(exc, (RepositoryNotFoundError, EntryNotFoundError))
                    and not isinstance(exc, LocalEntryNotFoundError))  # offline: not in the cache
        detail = " ".join(str(exc).split())[:200]
        raise (TaggerError if wrong_id else TaggerDownloadError)(
            f"--model {model}: cannot download {MODEL_FILE} and {TAGS_FILE} from the Hub "
            f"({type(exc).__name__}: {detail})") from None


def preprocess(image: Image.Image, side: int) -> np.ndarray:
    """``side x side x 3`` float32 BGR, 0-255: the image (RGB, alpha already on white) centred
    on a white square, then resized, as the WD14 taggers were trained."""
    width, height = image.size
    square = max(width, height)
    canvas = Image.new("RGB", (square, square), WHITE)
    canvas.paste(image.convert("RGB"), ((square - width) // 2, (square - height) // 2))
    if square != side:
        canvas = canvas.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(canvas, dtype=np.float32)[:, :, ::-1].copy()


def _session(model_path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise TaggerUnavailable(f"the tagger needs onnxruntime: {EXTRA_HINT}") from None
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return ort.InferenceSession(str(model_path), providers=providers or None)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        detail = " ".join(str(exc).split())[:200]
        raise TaggerError(f"{model_path}: not a usable ONNX model ({detail})") from None


class Tagger:
    """Tags images with a WD14-style model: general tags at or above ``general_threshold``,
    character tags at or above ``character_threshold``, each sorted by probability."""

    def __init__(self, model: str | Path = DEFAULT_MODEL, *,
                 general_threshold: float = DEFAULT_GENERAL_THRESHOLD,
                 character_threshold: float = DEFAULT_CHARACTER_THRESHOLD,
                 batch_size: int = 8) -> None:
        for name, value in (("general threshold", general_threshold),
                            ("character threshold", character_threshold)):
            if not 0 < value <= 1:
                raise TaggerError(f"the {name} must be in (0, 1], got {value:g}")
        model_path, tags_path = resolve_model(model)
        self.rows = read_tag_rows(tags_path)
        self.session = _session(model_path)
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        shape = self.session.get_inputs()[0].shape
        self.input_name = self.session.get_inputs()[0].name
        self.side = shape[1] if len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIDE
        fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        self.batch_size = fixed or max(1, int(batch_size))
        outputs = self.session.get_outputs()[0].shape
        if outputs and isinstance(outputs[-1], int) and outputs[-1] != len(self.rows):
            raise TaggerError(f"{model_path}: gives {outputs[-1]} outputs but {tags_path} lists "
                              f"{len(self.rows)} tags")

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``len(images) x tags`` probabilities, run in batches of the model's size."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([preprocess(img, self.side) for img in images[start:start + self.batch_size]])
            out.append(np.asarray(self.session.run(None, {self.input_name: batch})[0], dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, len(self.rows)), np.float32)

    def tagset(self, probs: np.ndarray) -> TagSet:
        """The tags of one image's probabilities, most certain first (ratings are left out:
        Danbooru captions here carry none either)."""
        def chosen(category: int, threshold: float) -> list[str]:
            hits = [(float(p), row.name) for row, p in zip(self.rows, probs)
                    if row.category == category and p >= threshold]
            return [name for _, name in sorted(hits, key=lambda hit: -hit[0])]

        return TagSet(general=chosen(GENERAL, self.general_threshold),
                      character=chosen(CHARACTER, self.character_threshold))


@dataclass
class TagSummary:
    """What ``tag_folder`` did: captions written, images left as they were, and why."""

    tagged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # already had a .txt caption
    no_tags: list[str] = field(default_factory=list)  # nothing above the thresholds: no file written
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> reason
    hidden_skipped: int = 0
    symlinks_refused: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tagged": len(self.tagged), "kept": len(self.kept), "no_tags": list(self.no_tags),
                "unreadable": dict(self.unreadable),
                "hidden_skipped": self.hidden_skipped, "symlinks_refused": list(self.symlinks_refused),
                "files": list(self.tagged)}

    def describe(self, folder: Path) -> str:
        text = f"tagged {len(self.tagged)} image(s) in {folder}"
        notes = []
        if self.kept:
            notes.append(f"{len(self.kept)} already had a caption, kept (--overwrite replaces them)")
        if self.no_tags:
            notes.append(f"{len(self.no_tags)} got no tag above the thresholds, no caption written")
        if self.unreadable:
            name, reason = next(iter(self.unreadable.items()))
            notes.append(f"{len(self.unreadable)} unreadable (e.g. {name}: {reason})")
        if self.hidden_skipped:
            notes.append(f"{self.hidden_skipped} hidden file(s) skipped")
        if self.symlinks_refused:
            notes.append(f"{len(self.symlinks_refused)} symlink(s) out of the folder refused")
        return text + (f"; {'; '.join(notes)}" if notes else "")


def tag_folder(folder: Path | str, tagger: Tagger, *, overwrite: bool = False,
               caption: CaptionOptions | None = None,
               on_progress: Callable[[dict[str, Any]], None] | None = None) -> TagSummary:
    """Write ``<image>.txt`` beside every image under ``folder`` that has no caption file (or
    beside every image, with ``overwrite``), each written atomically. Images are found as
    ``import`` finds them (hidden names skipped, symlinks out of the folder refused)."""
    from lora.data.images import ImageRejected, load_image
    from lora.data.importer import FolderScan, _image_files

    root = Path(folder)
    if not root.is_dir():
        raise TaggerError(f"{root}: not a folder")
    scan = FolderScan()
    images = _image_files(root.resolve(), scan, follow_symlinks=False)
    summary = TagSummary(hidden_skipped=scan.hidden_skipped, symlinks_refused=list(scan.symlinks_refused))
    todo = []
    for path in images:
        rel = path.relative_to(root.resolve()).as_posix()
        (todo.append((path, rel)) if overwrite or not path.with_suffix(".txt").exists()
         else summary.kept.append(rel))
    options = caption or CaptionOptions()
    for start in range(0, len(todo), tagger.batch_size):
        loaded = []
        for path, rel in todo[start:start + tagger.batch_size]:
            try:
                loaded.append((path, rel, load_image(path)))
            except ImageRejected as exc:
                summary.unreadable[rel] = exc.reason
            if on_progress is not None:
                on_progress({"total": len(todo), "round": 1})
        if not loaded:
            continue
        for (path, rel, _), probs in zip(loaded, tagger.probabilities([img for _, _, img in loaded])):
            text = build_caption(tagger.tagset(probs), options)
            if not text:  # an empty file would read as "has a caption" to the next tag run
                summary.no_tags.append(rel)
                continue
            write_caption(path.with_suffix(".txt"), text)
            summary.tagged.append(rel)
    log.info("tagged %d image(s) in %s", len(summary.tagged), root)
    return summary
