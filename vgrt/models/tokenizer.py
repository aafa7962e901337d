"""Prompt tokenizers: CLIP's own from a weights folder, or one vgrt trains itself for presets.

CLIP's vocabulary cannot be downloaded here, so presets use a small BPE that vgrt trains on prompts it
ships. The training is vgrt's own and deterministic (ties between equally frequent pairs go to the
lexicographically first pair, ids follow sorted symbols then merge order), so every process gives the
same ids: `tokenizers`' trainer numbers symbols in hash-map order, which differs from process to
process even with PYTHONHASHSEED fixed. Encoding is `tokenizers`' BPE over the trained merges. The
contract is CLIP's: lower-cased text, start token, tokens, end token, padded to the text encoder's length.
Real weights folders bring `tokenizer/` (a single-file checkpoint, which holds none, finds it beside itself).
"""

import logging
from collections import Counter
from functools import cache
from importlib import resources
from itertools import pairwise
from pathlib import Path

import torch

from vgrt.errors import WeightsError
from vgrt.models.single_file import is_original_checkpoint
from vgrt.models.source import ModelSource

log = logging.getLogger(__name__)

_TRAINED_VOCAB_LIMIT = 4096
_UNKNOWN, _END_OF_WORD = "<unk>", "</w>"


class PromptTokenizer:
    """prompts -> input_ids [B, length] (int64): start token, tokens (truncated), end token, padding."""

    def __init__(self, encode, start: int, end: int, pad: int, length: int):
        self._encode, self.start, self.end, self.pad, self.length = encode, start, end, pad, length

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        ids = torch.full((len(prompts), self.length), self.pad, dtype=torch.int64)
        window = self.length - 2  # start and end tokens take two places
        for row, prompt in enumerate(prompts):
            encoded = self._encode(prompt)
            if len(encoded) > window:
                log.warning(
                    "prompt %r has %d tokens; the text encoder reads %d, so the rest is cut: shorten it",
                    prompt if len(prompt) <= 60 else prompt[:57] + "...", len(encoded), window,
                )  # fmt: skip
            tokens = [self.start, *encoded[:window], self.end]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


def load_tokenizer(source: ModelSource, folder: str = "tokenizer", encoder: str = "text_encoder") -> PromptTokenizer:
    """The tokenizer of `source`: `<weights>/<folder>/` (vocab.json + merges.txt) or a trained preset one."""
    config = getattr(source.model_preset(), encoder) or {}
    home = _tokenizer_home(source)
    if home is not None:
        local = home / folder
        if not (local / "vocab.json").is_file() or not (local / "merges.txt").is_file():
            raise WeightsError(
                f"{str(local)!r} needs vocab.json and merges.txt (CLIP's tokenizer files): copy {folder}/ from the "
                "model's diffusers folder as published"
            )
        from transformers import CLIPTokenizer

        # from the folder's configs too: SDXL's tokenizer_2 pads with "!", not with the end token
        clip = CLIPTokenizer.from_pretrained(str(local), local_files_only=True)
        encode = lambda text: clip(text, add_special_tokens=False)["input_ids"]
        return PromptTokenizer(
            encode, clip.bos_token_id, clip.eos_token_id, clip.pad_token_id, config["max_position_embeddings"]
        )
    vocab = config["vocab_size"]
    start, end = config.get("bos_token_id", vocab - 2), config.get("eos_token_id", vocab - 1)
    trained = _preset_bpe(min(vocab - 2, _TRAINED_VOCAB_LIMIT))
    return PromptTokenizer(
        lambda text: trained.encode(text).ids,
        start,
        end,
        config.get("pad_token_id", end),
        config["max_position_embeddings"],
    )


def _tokenizer_home(source: ModelSource) -> Path | None:
    """Where the tokenizer folders are: the weights folder, or a single-file checkpoint's folder (the file
    holds no tokenizer); None for presets and UNet-only files, which use the preset's."""
    if not source.weights:
        return None
    if Path(source.weights).is_dir():
        return Path(source.weights)
    return Path(source.weights).parent if is_original_checkpoint(source.weights) else None


@cache
def _preset_bpe(vocab_size: int):
    """A BPE tokenizer of at most `vocab_size` tokens trained on the shipped prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab, merges = train_bpe(_preset_words(), vocab_size)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=_UNKNOWN, end_of_word_suffix=_END_OF_WORD))
    tokenizer.normalizer, tokenizer.pre_tokenizer = _normalizer(), pre_tokenizers.Whitespace()
    return tokenizer


def preset_bpe_merges(vocab_size: int) -> list[tuple[str, str]]:
    """The merges of the preset BPE trained to `vocab_size` tokens, in order (for CLIP-format tokenizer files)."""
    return train_bpe(_preset_words(), vocab_size)[1]


def _normalizer():
    from tokenizers import normalizers

    return normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])


@cache
def _preset_words() -> Counter[str]:
    """Word counts of the prompts vgrt ships, normalised and split as the preset tokenizer splits text."""
    from tokenizers import pre_tokenizers

    normalizer, pre_tokenizer = _normalizer(), pre_tokenizers.Whitespace()
    corpus = resources.files("vgrt.models").joinpath("data/prompts.txt").read_text().splitlines()
    return Counter(
        word for line in corpus if not line.startswith("#") for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    )  # fmt: skip


def train_bpe(words: Counter[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-pair merges learned from word counts, deterministically: the most frequent adjacent pair is
    merged first, ties go to the lexicographically first pair. Returns (token -> id, merges in order);
    ids are the unknown token, the sorted symbols of the words, then each merge's result."""
    # A word is its characters with the end-of-word mark on the last, as the BPE model splits it.
    spelled = {(*word[:-1], word[-1] + _END_OF_WORD): count for word, count in words.items() if word}
    tokens = [_UNKNOWN, *sorted({symbol for word in spelled for symbol in word})][:vocab_size]
    merges: list[tuple[str, str]] = []
    while len(tokens) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in spelled.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break  # every word is one token
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        tokens.append(best[0] + best[1])
        spelled = {_merge(word, best): count for word, count in spelled.items()}
    return {token: index for index, token in enumerate(tokens)}, merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)
