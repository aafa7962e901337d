"""Attention suite: `masked_attention` alone, dense and masked, at the presets' attention layer sizes.

Shapes come from each preset's UNet config at its profile's batch and latent size: per resolution level
with cross-attention, one self-attention case (keys = queries) and one cross-attention case (keys = the
text tokens). SD 1.5 at 64x64 latents gives Lq 4096/1024/256 with 8 heads of 40/80/160; SDXL at
128x128 gives Lq 4096/1024 with 10/20 heads of 64.

Competitors, all fed the same tensors:
- torch: the reference (`masked_attention`: PyTorch SDPA with a float bias, empty rows zeroed), the baseline;
- torch-sdpa-bool: PyTorch SDPA given the boolean mask directly (no empty-row guard);
- <onnxruntime backend>-<form>: the op exported alone in each ONNX form (custom node, Attention op,
  decomposed MatMul/Softmax), on the CPU or the CUDA provider;
- triton: vgrt's kernel with the compact tile mask, so it skips fully masked key tiles (GPU only).
Dense cases have no mask at all: torch, the Attention-op export (SDPA's ONNX form) and triton.
"""

import itertools
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vgrt.bench.attention_ops import DENSE, export_attention_models
from vgrt.bench.results import Case, SuiteOutput
from vgrt.bench.settings import BenchSettings
from vgrt.bench.timing import Competitor, measure
from vgrt.engines.ort_runner import OrtRunner, OrtSettings
from vgrt.export.exporter import DTYPES
from vgrt.models.presets import get_preset
from vgrt.plugins.masked_attention import additive_bias, masked_attention

log = logging.getLogger(__name__)

DENSITIES = (None, 1.0, 0.5, 0.1)  # share of keys each query may attend; None: no mask at all
QUICK_DENSITIES = (None, 0.5)
ORT_PROVIDERS = {"onnxruntime": "cpu", "onnxruntime-cuda": "cuda"}


@dataclass(frozen=True)
class AttentionShape:
    preset: str
    level: int  # UNet resolution level (0: full latent resolution)
    kind: str  # "self" or "cross"
    batch: int
    heads: int
    queries: int
    keys: int
    head_dim: int


def preset_shapes(name: str, batch: int | None = None, latent: int | None = None) -> Iterator[AttentionShape]:
    """The attention shapes of preset `name`'s UNet (diffusers' `attention_head_dim` is the head count)."""
    preset = get_preset(name)
    unet, profile = preset.unet, preset.profile
    batch, latent = batch or profile.batch.opt, latent or profile.latent.opt
    levels = len(unet["block_out_channels"])
    heads = unet["attention_head_dim"]
    heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
    for level, (channels, block) in enumerate(zip(unet["block_out_channels"], unet["down_block_types"])):
        if "CrossAttn" not in block:
            continue
        queries = (latent // 2**level) ** 2
        for kind, keys in (("self", queries), ("cross", profile.context.opt)):
            yield AttentionShape(name, level, kind, batch, heads[level], queries, keys, channels // heads[level])


def region_mask(shape: AttentionShape, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bool [B, 1, Lq, Lk] letting every query attend `density` of the keys, laid out like region masks.

    The query rows split into two regions (upper and lower half of the latent in raster order); each
    may attend one contiguous run of keys at its own random offset. Contiguous runs are what a region
    looks like in raster order, and what lets a tile-skipping kernel skip whole key tiles.
    """
    allowed = max(1, round(density * shape.keys))
    mask = torch.zeros(shape.batch, 1, shape.queries, shape.keys, dtype=torch.bool)
    half = shape.queries // 2
    for row, rows in itertools.product(range(shape.batch), (slice(0, half), slice(half, shape.queries))):
        start = int(torch.randint(0, shape.keys - allowed + 1, (), generator=generator))
        mask[row, 0, rows, start : start + allowed] = True
    return mask


def run(settings: BenchSettings) -> SuiteOutput:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    densities = QUICK_DENSITIES if settings.quick else DENSITIES
    providers = {b: p for b, p in ORT_PROVIDERS.items() if b in settings.backends}
    sizes = list(itertools.product(settings.presets, settings.batches or (None,), settings.latents or (None,)))
    cases = []
    with tempfile.TemporaryDirectory(prefix="vgrt-bench-attention-") as tmp:
        for dtype in settings.dtypes:
            torch_dtype = DTYPES[dtype][1]
            with _ort_sessions(Path(tmp), dtype, providers, settings.threads) as sessions:
                for preset, batch, latent in sizes:
                    for shape, density in itertools.product(preset_shapes(preset, batch, latent), densities):
                        log.info("timing %s, density %s, %s", shape, density or DENSE, dtype)
                        competitors = _competitors(shape, density, torch_dtype, device, settings.backends, sessions)
                        cases.append(_case(shape, density, dtype, measure(competitors, settings.timing)))
    details = {"device": device, "densities": list(densities), "onnxruntime_threads": settings.threads}
    return SuiteOutput("+".join(settings.presets), tuple(cases), details)


@contextmanager
def _ort_sessions(
    tmp: Path, dtype: str, providers: dict[str, str], threads: int
) -> Iterator[dict[tuple[str, str], OrtRunner]]:
    """A session per exported attention model and ONNX Runtime backend asked for, keyed (backend, model)."""
    models = export_attention_models(tmp, dtype) if providers else {}
    with ExitStack() as stack:
        yield {
            (backend, name): stack.enter_context(
                OrtRunner(path, spec, OrtSettings(provider, threads, reuse_outputs=True))
            )
            for backend, provider in providers.items()
            for name, (path, spec) in models.items()
        }


def _case(shape: AttentionShape, density: float | None, dtype: str, measurements) -> Case:
    group = (
        f"{shape.preset} level {shape.level} {shape.kind}: Lq {shape.queries}, Lk {shape.keys}, "
        f"{shape.heads} heads x {shape.head_dim}, {dtype}"
    )
    label = DENSE if density is None else f"mask {density:.0%}"
    params = {**vars(shape), "density": DENSE if density is None else density, "dtype": dtype}
    return Case(group, label, params, measurements)


def _competitors(shape, density, dtype, device, backends, sessions) -> list[Competitor]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(shape.batch, shape.heads, length, shape.head_dim, generator=generator).to(dtype)
        for length in (shape.queries, shape.keys, shape.keys)
    )
    mask = None if density is None else region_mask(shape, density, generator)
    bias = None if mask is None else additive_bias(mask, dtype)
    cpu_feed = {"q": q, "k": k, "v": v} | ({} if bias is None else {"bias": bias})
    feed = {name: t.to(device) for name, t in cpu_feed.items()}
    clock = "cuda-events" if device == "cuda" else "wall"
    competitors = [Competitor("torch", "torch", lambda: masked_attention(**feed), clock)]
    if mask is not None:
        device_mask = mask.to(device)
        sdpa = lambda: F.scaled_dot_product_attention(feed["q"], feed["k"], feed["v"], attn_mask=device_mask)
        competitors.append(Competitor("torch-sdpa-bool", "torch", sdpa, clock))
    for (backend, model), runner in sessions.items():
        if (model == DENSE) == (mask is None):
            name = f"{backend}-{'attention' if model == DENSE else model}"
            ort_feed = cpu_feed if backend == "onnxruntime" else feed
            competitors.append(Competitor(name, backend, _ort_call(runner, ort_feed)))
    if "triton" in backends:
        competitors.append(Competitor("triton", "triton", _triton_call(feed), clock))
    return competitors


def _ort_call(runner: OrtRunner, feed: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    runner.spec.validate(feed)  # once: the timed calls measure the engine, not vgrt's input checks
    return lambda: runner.infer(feed, validate=False)["out"]


def _triton_call(feed: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    from vgrt.plugins.masked_attention.triton_kernel import block_mask_from_bias, masked_attention_triton

    bias = feed.get("bias")
    # The runtime builds the compact tile mask once per layer from the compact region inputs; outside the timing.
    tiles = None if bias is None else block_mask_from_bias(bias, feed["q"].shape[2], feed["k"].shape[2])
    return lambda: masked_attention_triton(feed["q"], feed["k"], feed["v"], bias, block_mask=tiles)
