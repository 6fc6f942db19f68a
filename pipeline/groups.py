"""In-batch candidate groups: G distinct images with one caption each, distinct caption texts.

Scoring a group's G x G matrix gives both directions at once: row i ranks the G captions for
image i (text retrieval), column j ranks the G images for caption j (image retrieval); the
diagonal holds the positives and every other cell is a random negative. Teacher fine-tuning
trains on such groups and the teacher stage caches them. Two captions with the same text never
share a group, so no negative is secretly a positive.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

import numpy as np

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
