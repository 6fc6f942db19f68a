"""Pairs/s of the evaluation path against the bare ViLT forward, on the same pairs and batch size.

    .venv/bin/python bench/eval_throughput.py                       # shapes preset, 20 images
    .venv/bin/python bench/eval_throughput.py --model models/shapes-teacher --images 40 --threads 2

(a) `PairScorer.matrix`: each image is embedded once (patch projection, position and [CLS]
tokens) and the result is shared by every caption of its row; batches never mix images.
(b) `model(input_ids, attention_mask, pixel_values, pixel_mask)`: the plain transformers call,
which embeds the image again for every pair, in batches of the same size over the same
image x caption pairs in the same (row-major) order.
Data: the test split of the shapes benchmark (DataConfig defaults, 40 -> 24 text tokens),
generated first if missing; the first --images images and their captions. The last line is the
ratio (a)/(b).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import DataConfig, open_data
from pipeline.models import build_model, load_model
from pipeline.scoring import PairScorer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="save_pretrained folder (default: the `shapes` preset, random init)",
    )
    parser.add_argument("--images", type=int, default=20, help="test images (x their captions)")
    parser.add_argument(
        "--batch",
        type=int,
        default=50,
        help="pairs per forward; a divisor of the captions keeps (a) and (b) "
        "at exactly this size, since (a) never mixes images",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return parser.parse_args()


@torch.inference_mode()
def bare_forward(
    model, data, image_ids: list[int], caption_ids: list[int], batch: int
) -> torch.Tensor:
    """Scores (I, C) from the plain forward, `batch` pairs at a time, row-major."""
    pair_images = torch.tensor(image_ids).repeat_interleave(len(caption_ids))
    pair_captions = torch.tensor(caption_ids).repeat(len(image_ids))
    scores = []
    for start in range(0, len(pair_images), batch):
        pixels, pixel_mask = data.images.batch(pair_images[start : start + batch].tolist())
        input_ids, attention_mask = data.captions.batch(pair_captions[start : start + batch])
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixels,
            pixel_mask=pixel_mask,
        )
        scores.append(output.logits[:, 0])
    return torch.cat(scores).view(len(image_ids), len(caption_ids))


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = open_data(DataConfig(max_tokens=24), ("test",))
    model = load_model(args.model) if args.model else build_model("shapes", seed=0)
    model.eval()
    scorer = PairScorer(model, data.images, data.captions, torch.device("cpu"))

    # the first N test images and only their captions, as `evaluate --set max_images=N` scores
    image_ids = data.dataset.image_ids()[: args.images]
    caption_ids = [c for i in image_ids for c in data.dataset.image(i).caption_ids]
    pairs = len(image_ids) * len(caption_ids)
    print(
        f"model: {args.model or 'shapes preset (random init)'}, "
        f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}; "
        f"{len(image_ids)} images x {len(caption_ids)} captions = {pairs} pairs; "
        f"batch {args.batch}; {torch.get_num_threads()} threads; "
        f"text length {data.captions.input_ids.shape[1]} tokens"
    )

    # warm up both paths (allocator, kernels), then one timed pass each
    scorer.matrix(image_ids[:1], caption_ids[: args.batch], args.batch)
    bare_forward(model, data, image_ids[:1], caption_ids[: args.batch], args.batch)
    fast, fast_seconds = timed(lambda: scorer.matrix(image_ids, caption_ids, args.batch))
    bare, bare_seconds = timed(
        lambda: bare_forward(model, data, image_ids, caption_ids, args.batch)
    )

    fast_rate, bare_rate = pairs / fast_seconds, pairs / bare_seconds
    print(f"max |(a) - (b)| over all scores: {(fast - bare).abs().max().item():.2e}")
    print(
        f"(a) PairScorer.matrix (shared image embeddings): {fast_rate:9.1f} pairs/s "
        f"({fast_seconds:.2f} s)"
    )
    print(
        f"(b) bare model forward (pixels per pair):         {bare_rate:9.1f} pairs/s "
        f"({bare_seconds:.2f} s)"
    )
    print(f"ratio (a)/(b): {fast_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
