"""Prompt tokenizers: CLIP's own from a weights folder, or one vgrt trains itself for presets.

CLIP's vocabulary cannot be downloaded here, so presets use a small BPE trained (deterministically, in
milliseconds) on prompts shipped with vgrt. It follows CLIP's contract: lower-cased text, start token,
tokens, end token, padded to the text encoder's length. Real weights folders bring `tokenizer/`.
"""

from functools import cache
from importlib import resources
from pathlib import Path

import torch

from vgrt.errors import WeightsError
from vgrt.models.presets import get_preset
from vgrt.models.source import ModelSource

_TRAINED_VOCAB_LIMIT = 4096


class PromptTokenizer:
    """prompts -> input_ids [B, length] (int64): start token, tokens (truncated), end token, padding."""

    def __init__(self, encode, start: int, end: int, pad: int, length: int):
        self._encode, self.start, self.end, self.pad, self.length = encode, start, end, pad, length

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        ids = torch.full((len(prompts), self.length), self.pad, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            tokens = [self.start, *self._encode(prompt)[: self.length - 2], self.end]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


def load_tokenizer(source: ModelSource, folder: str = "tokenizer", encoder: str = "text_encoder") -> PromptTokenizer:
    """The tokenizer of `source`: `<weights>/<folder>/` (vocab.json + merges.txt) or a trained preset one."""
    preset = get_preset(source.preset)
    config = getattr(preset, encoder) or {}
    if source.weights and Path(source.weights).is_dir():
        local = Path(source.weights) / folder
        if not (local / "vocab.json").is_file() or not (local / "merges.txt").is_file():
            raise WeightsError(f"{str(local)!r} needs vocab.json and merges.txt (CLIP's tokenizer files)")
        from transformers import CLIPTokenizer

        clip = CLIPTokenizer(str(local / "vocab.json"), str(local / "merges.txt"))
        encode = lambda text: clip(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        return PromptTokenizer(encode, clip.bos_token_id, clip.eos_token_id, clip.pad_token_id, config["max_position_embeddings"])
    vocab = config["vocab_size"]
    start, end = config.get("bos_token_id", vocab - 2), config.get("eos_token_id", vocab - 1)
    trained = _trained_bpe(min(vocab - 2, _TRAINED_VOCAB_LIMIT))
    return PromptTokenizer(lambda text: trained.encode(text).ids, start, end, config.get("pad_token_id", end), config["max_position_embeddings"])


@cache
def _trained_bpe(vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], end_of_word_suffix="</w>", show_progress=False)
    corpus = resources.files("vgrt.models").joinpath("data/prompts.txt").read_text().splitlines()
    tokenizer.train_from_iterator([line for line in corpus if not line.startswith("#")], trainer)
    return tokenizer
