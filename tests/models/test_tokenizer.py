"""Preset tokenizers follow CLIP's contract; real tokenizer files are required when weights are given."""

import json
import logging
import os
import subprocess
import sys
from collections import Counter

import pytest

from vgrt.errors import WeightsError
from vgrt.models.presets import get_preset
from vgrt.models.source import ModelSource
from vgrt.models.tokenizer import load_tokenizer, train_bpe


@pytest.mark.parametrize("preset", ["tiny", "sd15"])
def test_preset_tokenizer_pads_like_clip(preset):
    config = get_preset(preset).text_encoder
    tokenize = load_tokenizer(ModelSource(preset))
    ids = tokenize(["a dog on a beach at sunset", "a cat"])
    assert ids.shape == (2, 77) and ids.max() < config["vocab_size"] and ids.min() >= 0
    assert ids[0, 0] == tokenize.start == config.get("bos_token_id", config["vocab_size"] - 2)
    end = tokenize.end
    first_end = (ids[1] == end).nonzero()[0].item()
    assert first_end > 1 and (ids[1, first_end:] == tokenize.pad).all()
    assert not (ids[0] == ids[1]).all()
    assert (tokenize(["a dog on a beach at sunset"]) == ids[:1]).all()  # deterministic


def test_long_prompts_are_truncated_with_the_end_token_kept_and_said(caplog):
    tokenize = load_tokenizer(ModelSource("tiny"))
    with caplog.at_level(logging.WARNING, logger="vgrt"):
        ids = tokenize("a red car in the rain " * 40)
    assert ids.shape == (1, 77) and ids[0, -1] == tokenize.end
    assert "has 240 tokens; the text encoder reads 75" in caplog.text and "shorten it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vgrt"):
        tokenize("a red car in the rain")
    assert caplog.text == ""


_PRINT_IDS = """
import json
from vgrt.models.source import ModelSource
from vgrt.models.tokenizer import load_tokenizer
print(json.dumps({p: load_tokenizer(ModelSource(p))(["a dog on a beach at sunset", "a red car"]).tolist() for p in ("tiny", "sd15")}))
"""


def test_preset_ids_are_the_same_in_every_process():
    """The tokenizers library's own trainer numbered symbols differently per process (LocRef with one
    seed gave 4 different images in 4 processes); vgrt's trainer must not."""
    runs = []
    for hash_seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", _PRINT_IDS], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    assert runs[0] == runs[1] == runs[2]
    assert runs[0]["tiny"][0][:4] == [998, 3, 217, 50]  # "a dog on": pinned, so a change of the trainer is seen


def test_bpe_training_merges_the_most_frequent_pair_and_breaks_ties_by_order():
    vocab, merges = train_bpe(Counter({"abab": 2, "cd": 3, "ef": 3}), vocab_size=100)
    # pair counts: (c,d</w>) 3, (e,f</w>) 3, then (a,b), (a,b</w>), (b,a) 2 each: ties in lexicographic order
    assert merges[:4] == [("c", "d</w>"), ("e", "f</w>"), ("a", "b"), ("a", "b</w>")]
    assert list(vocab)[:8] == ["<unk>", "a", "b", "b</w>", "c", "d</w>", "e", "f</w>"]
    assert list(vocab)[8:10] == ["cd</w>", "ef</w>"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    small, small_merges = train_bpe(Counter({"abab": 2, "cd": 3, "ef": 3}), vocab_size=9)
    assert len(small) == 9 and small_merges == merges[: 9 - (len(vocab) - len(merges))]


def test_weights_folder_without_tokenizer_files_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="vocab.json and merges.txt"):
        load_tokenizer(ModelSource("tiny", weights=str(tmp_path)))


def test_a_tokenizer_folder_pads_with_its_own_pad_token(tmp_path):
    # SDXL's tokenizer_2 pads with "!" where tokenizer/ pads with the end token: the ids after the end token
    # reach the second text encoder, so the folder's own setting must be read.
    from vgrt.models.diffusers_folder import write_clip_tokenizer

    config = get_preset("tiny").text_encoder
    write_clip_tokenizer(tmp_path / "tokenizer", config)
    settings = tmp_path / "tokenizer" / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "pad_token": "!"}))
    tokenize = load_tokenizer(ModelSource("tiny", weights=str(tmp_path)))
    exclamation = json.loads((tmp_path / "tokenizer" / "vocab.json").read_text())["!"]
    ids = tokenize(["a cat"])
    assert tokenize.pad == exclamation != tokenize.end
    assert (ids[0, 4:] == exclamation).all() and ids[0, 3] == tokenize.end  # start, "a", "cat", end, padding
