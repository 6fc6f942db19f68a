"""In-batch candidate groups: G distinct images with one caption each, distinct caption texts.

Scoring a group's G x G matrix gives both directions at once: row i ranks the G captions for
image i (text retrieval), column j ranks the G images for caption j (image retrieval); the
diagonal holds the positives and every other cell is a random negative. Teacher fine-tuning
trains on such groups and the teacher stage caches them. Two captions with the same text never
share a group, so no negative is secretly a positive.

`neighbour_groups` builds harder groups for fine-tuning: G / 2 pairs of images whose captions
share the most words (TF-IDF cosine), so most queries meet a near-duplicate among their
negatives (on shapes, typically the scene's minimal-pair twin or a scene with the same objects).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import deque
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch

from pipeline.karpathy import RetrievalDataset

log = logging.getLogger(__name__)


class GroupError(ValueError):
    """A group size the split cannot serve; the message names the size and the split."""


def make_groups(
    dataset: RetrievalDataset, group_size: int, seed: int, round_index: int = 0
) -> np.ndarray:
    """Groups of one round: an int64 array (num_groups, G, 2) of (image_id, caption_id).

    A pure function of (dataset, G, seed, round). Images are shuffled; each gets a random caption
    whose text is new to its group (else it waits for the next group). Leftover images that do
    not fill a last group are dropped for this round (a new round shuffles them back in).
    """
    if group_size < 2 or group_size > len(dataset.images):
        raise GroupError(
            f"group size {group_size} must be in [2, {len(dataset.images)}] (the number of "
            f"images in split {dataset.split_names or 'all'} of dataset '{dataset.name}')"
        )
    rng = np.random.default_rng([seed, round_index])
    texts = {c: " ".join(t.lower().split()) for c, t in dataset.captions.items()}
    pending = deque(dataset.images[i] for i in rng.permutation(len(dataset.images)))
    groups: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    deferred = []
    while pending:
        entry = pending.popleft()
        taken = {texts[caption_id] for _, caption_id in current}
        choices = [int(c) for c in rng.permutation(entry.caption_ids) if texts[int(c)] not in taken]
        if not choices:
            deferred.append(entry)  # every caption repeats a text already in this group
            continue
        current.append((entry.image_id, choices[0]))
        if len(current) == group_size:
            groups.append(current)
            current = []
            pending.extendleft(reversed(deferred))
            deferred = []
    dropped = len(dataset.images) - group_size * len(groups)
    log.debug("groups: %d of size %d, %d images left over", len(groups), group_size, dropped)
    return np.array(groups, dtype=np.int64).reshape(len(groups), group_size, 2)


def iter_groups(
    dataset: RetrievalDataset, group_size: int, seed: int, round_index: int
) -> Iterator[np.ndarray]:
    """The groups of one round, one (G, 2) array at a time."""
    yield from make_groups(dataset, group_size, seed, round_index)


def neighbour_groups(
    dataset: RetrievalDataset, group_size: int, seed: int, round_index: int = 0
) -> np.ndarray:
    """Groups of one round made of neighbour pairs: an int64 array (num_groups, G, 2).

    Each round, images are visited in a seeded random order and each unpaired image is paired
    with its most similar still-unpaired image among its `NEIGHBOURS` nearest by caption words
    (images left without one are paired at random). The pairs are shuffled into groups of
    G / 2 pairs, one random caption per image whose text is new to its group. A pure function
    of (dataset, G, seed, round), like `make_groups`.
    """
    if group_size % 2 or not 2 <= group_size <= len(dataset.images):
        raise GroupError(
            f"group size {group_size} must be even and in [2, {len(dataset.images)}] for "
            f"neighbour pairs (images in split {dataset.split_names or 'all'} of dataset "
            f"'{dataset.name}')"
        )
    rng = np.random.default_rng([seed, round_index])
    neighbours = caption_neighbours(dataset)
    paired = np.full(len(dataset.images), -1)
    for index in rng.permutation(len(dataset.images)):
        if paired[index] < 0:
            free = [int(n) for n in neighbours[index] if paired[n] < 0 and n != index]
            if free:
                paired[index], paired[free[0]] = free[0], index
    alone = np.flatnonzero(paired < 0)
    alone = alone[rng.permutation(len(alone))]
    paired[alone[0::2][: len(alone) // 2]] = alone[1::2]
    pairs = [(int(i), int(paired[i])) for i in np.flatnonzero(paired > np.arange(len(paired)))]
    pairs += [(int(j), int(i)) for i, j in zip(alone[0::2], alone[1::2])]

    texts = {c: " ".join(t.lower().split()) for c, t in dataset.captions.items()}
    groups, current = [], []
    for k in rng.permutation(len(pairs)):
        taken = {texts[c] for _, c in current}
        chosen = []
        for index in pairs[k]:
            entry = dataset.images[index]
            options = [
                int(c) for c in rng.permutation(entry.caption_ids) if texts[int(c)] not in taken
            ]
            if not options:
                break
            chosen.append((entry.image_id, options[0]))
            taken.add(texts[options[0]])
        if len(chosen) < 2:
            continue  # both captions would repeat texts of this group: the pair sits this round out
        current += chosen
        if len(current) == group_size:
            groups.append(current)
            current = []
    return np.array(groups, dtype=np.int64).reshape(len(groups), group_size, 2)


NEIGHBOURS = 8


def caption_neighbours(dataset: RetrievalDataset, block: int = 512) -> np.ndarray:
    """(N, NEIGHBOURS) indices into `dataset.images` of each image's nearest images by the
    TF-IDF cosine of all its captions' words, most similar first (the image itself excluded)."""
    return _neighbours(
        tuple(tuple(dataset.captions[c] for c in e.caption_ids) for e in dataset.images), block
    )


@lru_cache(maxsize=4)
def _neighbours(captions: tuple[tuple[str, ...], ...], block: int) -> np.ndarray:
    vocabulary: dict[str, int] = {}
    rows, cols = [], []
    for row, texts in enumerate(captions):
        words = {w for text in texts for w in re.findall(r"[a-z0-9]+", text.lower())}
        rows += [row] * len(words)
        cols += [vocabulary.setdefault(word, len(vocabulary)) for word in sorted(words)]
    count, size = len(captions), (len(captions), len(vocabulary))
    rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    idf = torch.log(count / torch.bincount(cols_t, minlength=len(vocabulary)).double())
    values = idf[cols_t]
    norms = torch.zeros(count, dtype=torch.double).index_add_(0, rows_t, values**2).sqrt()
    values = values / norms.clamp_min(1e-12)[rows_t]  # unit rows: dot products are cosines
    columns = torch.sparse_coo_tensor(
        torch.stack([cols_t, rows_t]), values, size[::-1], check_invariants=True
    )
    columns = columns.coalesce()
    k = min(NEIGHBOURS, count - 1)
    found = np.empty((count, k), dtype=np.int64)
    bounds = np.searchsorted(np.array(rows), np.arange(0, count + block, block))
    for number, first in enumerate(range(0, count, block)):
        last = min(first + block, count)
        span = slice(int(bounds[number]), int(bounds[number + 1]))
        part = torch.sparse_coo_tensor(
            torch.stack([rows_t[span] - first, cols_t[span]]),
            values[span],
            (last - first, size[1]),
            check_invariants=True,
        )
        with warnings.catch_warnings():  # torch calls its sparse CSR support beta
            warnings.simplefilter("ignore", UserWarning)
            similarity = torch.sparse.mm(part, columns).to_dense()
        similarity[torch.arange(last - first), torch.arange(first, last)] = -1.0  # not itself
        found[first:last] = similarity.topk(k, dim=1).indices.numpy()
    return found
