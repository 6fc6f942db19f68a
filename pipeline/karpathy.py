"""Reader for Karpathy-split JSON: Flickr30K, MS-COCO and the generated shapes benchmark.

    python -c "from pathlib import Path; from pipeline.karpathy import load_karpathy; print(
        load_karpathy(Path('data/flickr30k/dataset_flickr30k.json'),
                      Path('data/flickr30k/flickr30k-images')))"

The file is `{"images": [{"filename", "filepath"?, "split", "imgid"?, "sentences": [{"raw",
"sentid"?}, ...]}, ...], "dataset"?}`. Image ids come from "imgid" (else the row's position),
caption ids from "sentid" (else a running index over all captions in file order).

Loading checks structure only and reports every bad row it finds in one DataError. Content
problems (empty captions, too few captions, missing or corrupt image files) are left to
`pipeline.datacheck`, which reports them all at once.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test", "restval")
# A broken file could yield one error per caption (616K for COCO); keep the report bounded.
_MAX_ERRORS = 1000
_ERRORS_IN_MESSAGE = 5
_NO_IMAGES = (
    'no top-level "images" list; expected a Karpathy split file ({"images": [{"filename": ..., '
    '"split": ..., "sentences": [...]}, ...]}) such as dataset_flickr30k.json or dataset_coco.json'
)


class DataError(ValueError):
    """Bad dataset input. The message names the file, the row and field, and what to do.

    `errors` holds every problem found, one line each (without the file name when built by
    `in_file`); the message shows the first few.
    """

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = list(errors) if errors else [message]

    @classmethod
    def in_file(cls, path: Path, problems: list[str]) -> DataError:
        """One error for all `problems` ("images[3].split: ...") found in the file `path`."""
        if len(problems) == 1:
            return cls(f"{path}: {problems[0]}", problems)
        shown = "\n  ".join(problems[:_ERRORS_IN_MESSAGE])
        more = len(problems) - _ERRORS_IN_MESSAGE
        tail = f"\n  ... and {more} more (`dcd data check NAME` lists them all)" if more > 0 else ""
        message = (
            f"{path}: {len(problems)} problems in the Karpathy split file; fix these rows "
            f"or use the original file:\n  {shown}{tail}"
        )
        return cls(message, problems)


@dataclass(frozen=True, slots=True)
class ImageEntry:
    image_id: int
    relpath: str  # "filepath/filename", or "filename" when the row has no filepath
    split: str  # one of SPLITS; "restval" becomes "train" when loaded with restval_as_train
    caption_ids: tuple[int, ...]


@dataclass(repr=False)  # __repr__ below: counts, not 616K captions
class RetrievalDataset:
    """Images and captions of one Karpathy file, in file order.

    `split_names` records a `split()` selection (None: the whole file); it enters the
    fingerprint so a subset never shares its identity with the full set.
    """

    name: str
    json_path: Path
    image_root: Path
    images: list[ImageEntry]
    captions: dict[int, str]  # caption_id -> raw text
    caption_image: dict[int, int]  # caption_id -> image_id
    restval_as_train: bool = False
    split_names: tuple[str, ...] | None = None
    file_sha256: str = ""  # of the JSON bytes; filled by load_karpathy, else read on demand
    _by_id: dict[int, ImageEntry] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self._by_id = {entry.image_id: entry for entry in self.images}

    def split(self, *names: str) -> RetrievalDataset:
        """The images of these splits and their captions, in file order."""
        unknown = [name for name in names if name not in SPLITS]
        if not names or unknown:
            raise ValueError(
                f"split names {list(names)} for dataset '{self.name}': "
                f"choose one or more of {', '.join(SPLITS)}"
            )
        wanted = set(names)
        images = [entry for entry in self.images if entry.split in wanted]
        caption_ids = [cid for entry in images for cid in entry.caption_ids]
        selected = tuple(s for s in SPLITS if s in wanted)
        if self.split_names is not None:
            selected = tuple(s for s in selected if s in self.split_names)
        return RetrievalDataset(
            name=self.name,
            json_path=self.json_path,
            image_root=self.image_root,
            images=images,
            captions={cid: self.captions[cid] for cid in caption_ids},
            caption_image={cid: self.caption_image[cid] for cid in caption_ids},
            restval_as_train=self.restval_as_train,
            split_names=selected,
            file_sha256=self.file_sha256,
        )

    def image(self, image_id: int) -> ImageEntry:
        try:
            return self._by_id[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id} is not in dataset '{self.name}'") from None

    def image_path(self, image_id: int) -> Path:
        return self.image_root / self.image(image_id).relpath

    def image_ids(self) -> list[int]:
        return [entry.image_id for entry in self.images]

    def caption_ids(self) -> list[int]:
        return list(self.captions)

    def split_counts(self) -> dict[str, int]:
        """Images per split, splits in SPLITS order, absent splits left out."""
        counts = dict.fromkeys(SPLITS, 0)
        for entry in self.images:
            counts[entry.split] += 1
        return {name: count for name, count in counts.items() if count}

    def fingerprint(self) -> str:
        """sha256 over the JSON bytes, the image folder's name and the load options.

        Uses the folder's name, not its full path, so the same data on another machine
        (or under another DCD_DATA_ROOT) has the same fingerprint.
        """
        file_digest = self.file_sha256 or hashlib.sha256(self.json_path.read_bytes()).hexdigest()
        parts = [file_digest, self.image_root.name, f"restval_as_train={self.restval_as_train}"]
        if self.split_names is not None:
            parts.append(f"splits={','.join(self.split_names)}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def __repr__(self) -> str:
        return (
            f"RetrievalDataset(name={self.name!r}, images={len(self.images)}, "
            f"captions={len(self.captions)}, splits={self.split_counts()}, "
            f"json_path='{self.json_path}')"
        )


def load_karpathy(
    json_path: Path,
    image_root: Path,
    name: str | None = None,
    restval_as_train: bool = False,
) -> RetrievalDataset:
    """Read a Karpathy split file; `name` defaults to its "dataset" field, else the file stem.

    Raises DataError listing every structural problem: unreadable or malformed JSON, no
    "images" list, rows without filename, unknown split values, duplicate image or caption ids.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    raw_bytes = _read_bytes(json_path)
    with _gc_paused():
        document = _parse_json(json_path, raw_bytes)
        rows = document.get("images") if isinstance(document, dict) else None
        if not isinstance(rows, list):
            raise DataError.in_file(json_path, [_NO_IMAGES])
        images, captions, caption_image, errors = _parse_rows(rows, restval_as_train)
        name = name or str(document.get("dataset") or json_path.stem)
        del document, rows  # freed here, while the GC cannot yet walk them
    if errors:
        raise DataError.in_file(json_path, errors)

    return RetrievalDataset(
        name=name,
        json_path=json_path,
        image_root=image_root,
        images=images,
        captions=captions,
        caption_image=caption_image,
        restval_as_train=restval_as_train,
        file_sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building millions of acyclic objects.

    Each generation-2 pass rescans every container built so far. Measured on a COCO-size
    synthetic file (139 MB, 123K images, 618K captions) on the 2-core dev machine: json.loads
    alone took 16 s CPU with the GC running and 2.7 s paused; this whole load takes 5.4 s.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read_bytes(json_path: Path) -> bytes:
    try:
        return json_path.read_bytes()
    except OSError as exc:
        raise DataError.in_file(
            json_path,
            [
                f"cannot read the dataset file ({exc.strerror or exc}); check the path "
                "(data_manifest.yaml, DCD_DATA_ROOT) and that the file is downloaded"
            ],
        ) from None


def _parse_json(json_path: Path, raw_bytes: bytes) -> object:
    try:
        return json.loads(raw_bytes)
    except json.JSONDecodeError as exc:
        raise DataError.in_file(
            json_path,
            [
                f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                "the file may be truncated (download it again) or not a Karpathy split file"
            ],
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError.in_file(
            json_path, [f"not UTF-8 text at byte {exc.start}; expected a Karpathy split JSON file"]
        ) from None


def _parse_rows(
    rows: list, restval_as_train: bool
) -> tuple[list[ImageEntry], dict[int, str], dict[int, int], list[str]]:
    """One pass over images[] in plain loops (COCO: 123K rows, 616K captions).

    Error texts are built only on the error path. After the first error the remaining rows are
    still checked, so one DataError lists them all, but no longer built into entries.
    """
    images: list[ImageEntry] = []
    captions: dict[int, str] = {}
    caption_image: dict[int, int] = {}
    image_row: dict[int, int] = {}  # image_id -> row, to name the first row of a duplicate
    errors: list[str] = []

    for row, item in enumerate(rows):
        if not isinstance(item, dict):
            errors.append(f"images[{row}]: expected an object, got {type(item).__name__}")
            continue
        relpath, split, image_id = _image_fields(row, item, image_row, errors)
        if restval_as_train and split == "restval":
            split = "train"

        # Captions: ids from "sentid", else the caption's position in the file (len(captions)
        # while the load is clean; any error fails it). Blank text is kept for the checker.
        sentences = item.get("sentences")
        if not isinstance(sentences, list):
            errors.append(f'images[{row}].sentences: missing or not a list of {{"raw": ...}}')
            sentences = []
        caption_ids = []
        for index, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            caption_id = sentence.get("sentid", len(captions)) if raw.__class__ is str else None
            if caption_id.__class__ is not int or caption_id in captions:  # bool is no id
                errors.append(_caption_error(row, index, raw, caption_id, image_row, caption_image))
                continue
            captions[caption_id] = raw
            caption_image[caption_id] = image_id
            caption_ids.append(caption_id)

        if len(errors) >= _MAX_ERRORS:
            errors.append(f"stopped at images[{row}] of {len(rows)}: too many problems")
            break
        if not errors:
            images.append(ImageEntry(image_id, relpath, split, tuple(caption_ids)))

    return images, captions, caption_image, errors


def _image_fields(
    row: int, item: dict, image_row: dict[int, int], errors: list[str]
) -> tuple[str, str, int | None]:
    """(relpath, split, image_id) of one row; problems go to `errors`, the id into `image_row`."""
    at = f"images[{row}]"
    filename, filepath, split = item.get("filename"), item.get("filepath"), item.get("split")
    if not isinstance(filename, str) or not filename:
        errors.append(f"{at}.filename: missing or empty; every image needs its file name")
    if filepath is not None and not isinstance(filepath, str):
        errors.append(f"{at}.filepath: expected a folder name string, got {filepath!r}")
        filepath = None
    if split not in SPLITS:
        errors.append(f"{at}.split: unknown value {split!r}; allowed: {', '.join(SPLITS)}")

    # "imgid" when present, else the row's position; must be unique.
    image_id = item.get("imgid", row)
    if image_id.__class__ is not int:  # bool is no id either
        errors.append(f"{at}.imgid: expected an integer, got {image_id!r}")
        image_id = None
    elif image_id in image_row:
        errors.append(
            f"{at}.imgid: duplicate image id {image_id} "
            f"(first at images[{image_row[image_id]}]); image ids must be unique"
        )
    else:
        image_row[image_id] = row
    relpath = f"{filepath}/{filename}" if filepath else filename
    return relpath, split, image_id


def _caption_error(
    row: int,
    index: int,
    raw: object,
    caption_id: object,
    image_row: dict[int, int],
    caption_image: dict[int, int],
) -> str:
    where = f"images[{row}].sentences[{index}]"
    if raw.__class__ is not str:
        return f'{where}.raw: missing or not a string; each caption needs "raw" text'
    if caption_id.__class__ is not int:
        return f"{where}.sentid: expected an integer, got {caption_id!r}"
    first_row = image_row.get(caption_image[caption_id], "?")
    return (
        f"{where}.sentid: duplicate caption id {caption_id} (first in images[{first_row}]); "
        "caption ids must be unique"
    )
