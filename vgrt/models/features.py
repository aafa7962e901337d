"""Conditioning features an exported UNet can carry, chosen at export time.

A plain export carries none and is the stock diffusers UNet. Each feature adds graph inputs and the
attention work that reads them; `layer_gates` lets the host switch gated features per step and per
transformer block without re-exporting.
"""

from vgrt.errors import InvalidInputError

FEATURES: dict[str, str] = {
    "key_mask": "cross-attention key mask over the context tokens (padding, masked tokens)",
    "extra_tokens": "extra token set with its own K/V projections and softmax, gated per query "
    "(IP-Adapter-style image tokens, fused tokens, instance tokens)",
    "kv_source": "keys of the extra tokens from a different token set than the values (KV-mixed)",
    "regions": "extra tokens restricted to spatial regions: per-query region masks x token-to-region map",
    "mutual": "self-attention with K/V (and Q) gathered from other batch rows in masked softmax groups, "
    "blended by per-query gates (MasaCtrl, MCA-Ctrl)",
    "probes": "second output attention_maps: each region's share of the extra tokens' attention per latent "
    "pixel, averaged over heads and cross-attention layers (see vgrt.models.probes)",
}
_REQUIRES = {"kv_source": "extra_tokens", "regions": "extra_tokens", "probes": "regions"}
OUTPUTS = ("probes",)  # features that add outputs rather than inputs; 'all' leaves them out
GATED = ("extra_tokens", "mutual")  # columns of `layer_gates`, in this order


def parse_features(text: str | list[str] | tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """'all' (every feature that adds inputs), 'none', or comma-separated names -> a validated feature set."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if names == ["all"]:
        return frozenset(FEATURES) - frozenset(OUTPUTS)
    if names in ([], ["none"]):
        return frozenset()
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise InvalidInputError(
            f"unknown feature(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(FEATURES)}, or 'all' / 'none'"
        )
    chosen = frozenset(names)
    for feature, needed in _REQUIRES.items():
        if feature in chosen and needed not in chosen:
            raise InvalidInputError(f"feature {feature!r} works on the extra tokens: add {needed!r} to --features")
    return chosen


def features_text(features: frozenset[str]) -> str:
    return ",".join(f for f in FEATURES if f in features) or "none"


def canonical_features(text: str | list[str] | tuple[str, ...] | frozenset[str]) -> str:
    """One spelling per feature set ('regions,extra_tokens' and 'extra_tokens,regions' name one layout)."""
    return features_text(parse_features(text))
