"""Preset tokenizers follow CLIP's contract; real tokenizer files are required when weights are given."""

import pytest

from vgrt.errors import WeightsError
from vgrt.models.presets import get_preset
from vgrt.models.source import ModelSource
from vgrt.models.tokenizer import load_tokenizer


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


def test_long_prompts_are_truncated_with_the_end_token_kept():
    tokenize = load_tokenizer(ModelSource("tiny"))
    ids = tokenize("a red car in the rain " * 40)
    assert ids.shape == (1, 77) and ids[0, -1] == tokenize.end


def test_weights_folder_without_tokenizer_files_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="vocab.json and merges.txt"):
        load_tokenizer(ModelSource("tiny", weights=str(tmp_path)))
