"""Caption tokenization: the 40-token cap, its log line, bad limits, the tokenizer fingerprint."""

from __future__ import annotations

import logging
import shutil

import pytest

from pipeline.text import (
    VILT_MAX_TOKENS,
    TokenizerError,
    default_tokenizer_dir,
    load_tokenizer,
    tokenize_captions,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_default_tokenizer_folder_is_found_and_is_bert_uncased(tokenizer):
    folder = default_tokenizer_dir()
    assert (folder / "vocab.txt").is_file()
    assert tokenizer.tokenize("A RED Circle") == ["a", "red", "circle"]
    assert tokenizer.cls_token_id == 101 and tokenizer.sep_token_id == 102  # BERT's ids


def test_long_caption_is_cut_to_the_cap_and_counted(tokenizer, caplog):
    captions = {70: " ".join(["red"] * 60), 71: "a blue square", 72: "a small green circle"}
    with caplog.at_level(logging.INFO, logger="pipeline.text"):
        tokens = tokenize_captions(tokenizer, captions, VILT_MAX_TOKENS)

    assert tokens.truncated == 1
    assert tokens.input_ids.shape == (3, 40)  # padded to the longest, which is the cap
    ids, mask = tokens.batch([70])
    assert int(mask.sum()) == 40
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, -1] == tokenizer.sep_token_id
    assert "1 of 3 captions cut to 40 tokens" in caplog.text


def test_short_captions_are_not_cut_and_log_nothing(tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.text"):
        tokens = tokenize_captions(tokenizer, {5: "a red circle", 9: "a big blue box above it"})
    assert tokens.truncated == 0
    assert "cut" not in caplog.text
    # [CLS] a red circle [SEP] is 5 tokens, then padding to the longest caption (8 tokens)
    assert tokens.input_ids.shape == (2, 8)
    assert tokens.attention_mask[tokens.index[5]].tolist() == [1] * 5 + [0] * 3


def test_rows_follow_caption_ids_not_positions(tokenizer):
    tokens = tokenize_captions(tokenizer, {500: "a red circle", 3: "a blue square"})
    ids, _ = tokens.batch([3, 500, 3])
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a blue square"
    assert tokenizer.decode(ids[1], skip_special_tokens=True) == "a red circle"
    assert ids[0].tolist() == ids[2].tolist()


def test_cap_below_40_counts_the_special_tokens(tokenizer):
    # "a red circle" is 3 word pieces + [CLS] + [SEP] = 5 tokens
    tokens = tokenize_captions(tokenizer, {1: "a red circle"}, max_tokens=5)
    assert tokens.truncated == 0
    tokens = tokenize_captions(tokenizer, {1: "a red circle"}, max_tokens=4)
    assert tokens.truncated == 1
    assert tokens.input_ids[0].tolist()[-1] == tokenizer.sep_token_id


@pytest.mark.parametrize("max_tokens", [0, 2, 41, 512])
def test_cap_out_of_range_is_an_error(tokenizer, max_tokens):
    with pytest.raises(TokenizerError, match=rf"max_tokens must be in \[3, 40\], got {max_tokens}"):
        tokenize_captions(tokenizer, {1: "a red circle"}, max_tokens=max_tokens)


def test_fingerprint_is_stable_and_tracks_the_vocabulary(tokenizer, tmp_path):
    first = tokenizer_fingerprint(tokenizer)
    assert first == tokenizer_fingerprint(load_tokenizer(default_tokenizer_dir()))
    assert len(first) == 16 and int(first, 16) >= 0

    # the same folder with one vocabulary line changed is a different tokenizer
    folder = tmp_path / "tok"
    folder.mkdir()
    lines = (default_tokenizer_dir() / "vocab.txt").read_text().splitlines()
    lines[2000] = "zzzqqq"
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n")
    shutil.copy(default_tokenizer_dir() / "tokenizer_config.json", folder)
    assert tokenizer_fingerprint(load_tokenizer(folder)) != first


def test_folder_without_vocabulary_is_an_error_naming_it(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
