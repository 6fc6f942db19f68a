"""The embedded benchmark "shapes": rendered scenes of coloured shapes with five captions each.

    dcd data shapes --out data/shapes

Written in Karpathy-split JSON (plus PNG files), so the reader that serves Flickr30K and COCO
serves it too. Scenes come in *minimal pairs*: every base scene has a twin in the same split that
differs in exactly one thing (two colours swapped, the spatial relation flipped, one colour, one
size or one shape changed). A bag of words cannot tell a colour swap or a flipped relation apart,
so hard negatives exist by construction and binding attributes to objects takes depth.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.fsio import atomic_path

log = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangle", "three sided shape"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
RELATION_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RADIUS = {"small": 0.1, "large": 0.17}  # share of the image side
CHANGES = ("colour_swap", "relation_flip", "colour", "size", "shape")


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, share of the image width
    y: float  # centre, share of the image height


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    relation: str | None  # how objects[0] sits relative to objects[1]


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """Sizes of the generated benchmark: images per split (each an even count: pairs)."""

    train: int = 2000
    val: int = 100
    test: int = 100
    image_size: int = 64
    seed: int = 0


# --- scenes -----------------------------------------------------------------------------------


def _random_object(rng: np.random.Generator, **fixed: object) -> ShapeObject:
    values = {
        "shape": str(rng.choice(list(SHAPE_WORDS))),
        "colour": str(rng.choice(list(COLOURS))),
        "size": str(rng.choice(list(SIZE_WORDS))),
        "x": 0.5,
        "y": 0.5,
    }
    values.update(fixed)
    return ShapeObject(**values)


def _place_pair(rng: np.random.Generator, relation: str) -> tuple[tuple[float, float], ...]:
    """Centres of two objects such that the first is clearly `relation` of the second."""
    near, far = rng.uniform(0.18, 0.28), rng.uniform(0.72, 0.82)
    jitter = rng.uniform(0.42, 0.66, size=2)
    if relation in ("left", "right"):
        first, second = (near, jitter[0]), (far, jitter[1])
    else:
        first, second = (jitter[0], near), (jitter[1], far)
    return (first, second) if relation in ("left", "above") else (second, first)


def random_scene(rng: np.random.Generator) -> Scene:
    """One, two (most often) or three objects; two-object scenes carry a spatial relation."""
    count = int(rng.choice([1, 2, 3], p=[0.1, 0.75, 0.15]))
    if count == 1:
        x, y = rng.uniform(0.3, 0.7, size=2)
        return Scene((_random_object(rng, x=float(x), y=float(y)),), None)
    relation = str(rng.choice(list(RELATION_WORDS)))
    (x0, y0), (x1, y1) = _place_pair(rng, relation)
    first = _random_object(rng, x=x0, y=y0)
    second = _random_object(rng, x=x1, y=y1)
    while (second.shape, second.colour) == (first.shape, first.colour):
        second = _random_object(rng, x=x1, y=y1)
    objects = [first, second]
    if count == 3:
        # the third object sits in the free corner band so that it never overlaps the pair
        cx, cy = (0.5, 0.1) if relation in ("left", "right") else (0.1, 0.5)
        objects.append(_random_object(rng, size="small", x=cx, y=cy))
    return Scene(tuple(objects), relation)


def minimal_twin(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """A scene that differs from `scene` in exactly one attribute; returns it and the change."""
    changes = CHANGES if scene.relation else ("colour", "size", "shape")
    change = str(rng.choice(changes))
    objects = list(scene.objects)
    if change == "colour_swap" and objects[0].colour != objects[1].colour:
        objects[0], objects[1] = (
            dataclasses.replace(objects[0], colour=objects[1].colour),
            dataclasses.replace(objects[1], colour=objects[0].colour),
        )
        return Scene(tuple(objects), scene.relation), change
    if change in ("colour_swap", "relation_flip"):
        a, b = objects[0], objects[1]
        objects[0] = dataclasses.replace(a, x=b.x, y=b.y)
        objects[1] = dataclasses.replace(b, x=a.x, y=a.y)
        return Scene(tuple(objects), INVERSE[scene.relation]), "relation_flip"
    attribute = {"colour": COLOURS, "size": SIZE_WORDS, "shape": SHAPE_WORDS}[change]
    index = int(rng.integers(min(2, len(objects))))
    current = getattr(objects[index], change)
    new_value = str(rng.choice([value for value in attribute if value != current]))
    objects[index] = dataclasses.replace(objects[index], **{change: new_value})
    return Scene(tuple(objects), scene.relation), change


# --- captions ---------------------------------------------------------------------------------


def _phrase(obj: ShapeObject, rng: np.random.Generator, with_size: bool = True) -> str:
    shape = str(rng.choice(SHAPE_WORDS[obj.shape]))
    size = str(rng.choice(SIZE_WORDS[obj.size])) + " " if with_size else ""
    return f"{size}{obj.colour} {shape}"


def _relation_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    a, b = scene.objects[0], scene.objects[1]
    rel = lambda r: str(rng.choice(RELATION_WORDS[r]))  # noqa: E731
    shape_a = str(rng.choice(SHAPE_WORDS[a.shape]))
    captions = [
        f"a {_phrase(a, rng)} {rel(scene.relation)} a {_phrase(b, rng)}",
        f"a {_phrase(b, rng)} {rel(INVERSE[scene.relation])} a {_phrase(a, rng)}",
        f"there is a {_phrase(a, rng, False)} {rel(scene.relation)} a {_phrase(b, rng, False)}",
        f"the {shape_a} {rel(scene.relation)} the {_phrase(b, rng, False)} is {a.colour}",
        f"a {_phrase(b, rng)} with a {_phrase(a, rng, False)} {rel(scene.relation)} it",
    ]
    if len(scene.objects) == 3:
        extra = _phrase(scene.objects[2], rng)
        captions[0] += f" and a {extra}"
        captions[2] = f"three shapes : {captions[2][len('there is ') :]} and a {extra}"
    return captions


def _single_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    obj = scene.objects[0]
    return [
        f"a {_phrase(obj, rng)}",
        f"a single {_phrase(obj, rng)} on a white background",
        f"one {_phrase(obj, rng, False)}",
        f"a {str(rng.choice(SHAPE_WORDS[obj.shape]))} that is {obj.colour}",
        f"just one {str(rng.choice(SIZE_WORDS[obj.size]))} {obj.colour} shape",
    ]


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five captions: synonyms, both word orders, partial descriptions, as real captions vary."""
    captions = _relation_captions(scene, rng) if scene.relation else _single_captions(scene, rng)
    return [re.sub(r"\ba (?=[aeiou])", "an ", text) for text in captions]


# --- rendering --------------------------------------------------------------------------------


def render(scene: Scene, size: int) -> bytes:
    """PNG bytes of the scene on a white background (deterministic for a given scene)."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        r = RADIUS[obj.size] * size
        cx, cy = obj.x * size, obj.y * size
        box = (cx - r, cy - r, cx + r, cy + r)
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# --- dataset ----------------------------------------------------------------------------------


def _scene_json(scene: Scene) -> dict:
    return {
        "relation": scene.relation,
        "objects": [dataclasses.asdict(obj) for obj in scene.objects],
    }


def build_entries(spec: ShapesSpec) -> list[tuple[dict, bytes]]:
    """Karpathy `images[]` entries with their PNG bytes, in file order (pairs adjacent)."""
    rng = np.random.default_rng(spec.seed)
    entries: list[tuple[dict, bytes]] = []
    for split in ("train", "val", "test"):
        for _ in range(getattr(spec, split) // 2):
            base = random_scene(rng)
            twin, change = minimal_twin(base, rng)
            first = len(entries)
            for offset, scene in enumerate((base, twin)):
                image_id = first + offset
                captions = captions_for(scene, rng)
                entry = {
                    "imgid": image_id,
                    "filename": f"{image_id:06d}.png",
                    "split": split,
                    "sentids": [image_id * 5 + k for k in range(5)],
                    "sentences": [
                        {"raw": text, "sentid": image_id * 5 + k, "tokens": text.split()}
                        for k, text in enumerate(captions)
                    ],
                    "scene": _scene_json(scene),
                    "twin": first + 1 - offset,
                    "twin_change": change,
                }
                entries.append((entry, render(scene, spec.image_size)))
    return entries


def write_shapes(spec: ShapesSpec, out_dir: Path) -> Path:
    """Write `out_dir/dataset.json` and `out_dir/images/*.png`; returns the JSON path.

    The whole folder appears at once (built under a temporary name), so an interrupted run
    leaves nothing half-written.
    """
    out_dir = Path(out_dir)
    entries = build_entries(spec)
    with atomic_path(out_dir) as tmp:
        (tmp / "images").mkdir(parents=True)
        for entry, png in entries:
            (tmp / "images" / entry["filename"]).write_bytes(png)
        payload = {
            "dataset": "shapes",
            "generator": {"seed": spec.seed, "image_size": spec.image_size},
            "images": [entry for entry, _ in entries],
        }
        (tmp / "dataset.json").write_text(json.dumps(payload, indent=1))
    log.info("shapes: wrote %d images, %d captions to %s", len(entries), 5 * len(entries), out_dir)
    return out_dir / "dataset.json"


# --- minimal-pair accuracy --------------------------------------------------------------------


def read_twins(json_path: Path) -> dict[int, tuple[int, str]]:
    """image id -> (twin image id, what the twin changes), from rows that carry `twin` (shapes
    rows do; any Karpathy file may); empty when no row does."""
    rows = json.loads(Path(json_path).read_text()).get("images", [])
    return {
        int(row["imgid"]): (int(row["twin"]), str(row.get("twin_change", "unknown")))
        for row in rows
        if "twin" in row and "imgid" in row
    }


def minimal_pair_accuracy(
    scores: np.ndarray,
    image_ids: list[int],
    caption_image: np.ndarray,
    twins: dict[int, tuple[int, str]],
) -> dict[str, dict[str, float]]:
    """How often a model prefers the right member of a minimal pair, per kind of change.

    `scores` (I, C) is an evaluation matrix, `caption_image[c]` the row of caption c's image.
    For an image i whose twin t is also evaluated: `tr` is the share of (own caption, twin
    caption) pairs that image i scores own > twin; `ir` the share of i's captions that score
    higher with i than with t. Ties count half; 0.5 is chance. Images whose twin is not among
    the rows are skipped. Keys: each change (e.g. colour_swap) and "all".
    """
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    columns = [np.flatnonzero(caption_image == row) for row in range(len(image_ids))]
    per_change: dict[str, list[tuple[float, float]]] = {}
    for image_id, (twin_id, change) in twins.items():
        if image_id not in row_of or twin_id not in row_of:
            continue
        i, t = row_of[image_id], row_of[twin_id]
        own, other = scores[i, columns[i]], scores[i, columns[t]]
        tr = _share_greater(own[:, None], other[None, :])
        ir = _share_greater(scores[i, columns[i]], scores[t, columns[i]])
        per_change.setdefault(change, []).append((tr, ir))
    result = {}
    for change, values in sorted(per_change.items()) + [
        ("all", [v for values in per_change.values() for v in values])
    ]:
        if values:
            tr, ir = np.mean(values, axis=0)
            result[change] = {"images": len(values), "tr": float(tr), "ir": float(ir)}
    return result


def _share_greater(left: np.ndarray, right: np.ndarray) -> float:
    return float(np.mean((left > right) + 0.5 * (left == right)))
