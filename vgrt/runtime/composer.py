"""The pipeline object: one model's engines on one backend, exported into the cache on first use.

    composer = Composer.from_preset("tiny", backend="onnxruntime")
    image = mca_ctrl.compose(composer, request).image

Encoders and adapters live in one cached export; each conditioned UNet feature set in its own, so a
method runs a UNet that carries only the attention work it needs.

Threads: a Composer may be shared by threads. Runners and modules are made once per key: a second
thread asking for one being made waits for it and reuses it, while other keys are made in parallel; the
runners themselves take concurrent calls (vgrt.engines.base).
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch

from vgrt.engines import BACKENDS, check_settings, open_runner
from vgrt.engines.base import Runner
from vgrt.errors import InvalidInputError
from vgrt.export.cache import cached_export
from vgrt.export.exporter import ExportSettings
from vgrt.models.presets import Preset, get_preset
from vgrt.models.source import ModelSource
from vgrt.models.tokenizer import PromptTokenizer, load_tokenizer

ENCODERS = (
    "vae_encoder,vae_decoder,text_encoder,image_encoder,image_proj,fusion_mlp,appearance_net,aligner,"
    "layout_adapter,appearance_adapter"
)


@dataclass
class Composer:
    """Engines of one model opened on one backend; runners open on first use and stay open.

    Args:
        source: preset and seed, or a local weights folder.
        backend: 'onnxruntime' (default), 'torch' or 'openvino' (vgrt.engines.BACKENDS).
        dtype: 'fp32' or 'fp16' engines.
        cache: export cache directory (default: $VGRT_CACHE or ~/.cache/vgrt).
        progress: show progress bars.
        runner_options: keyword settings for every runner it opens, as `open_runner` takes them
            (OrtSettings fields for onnxruntime, e.g. intra_op_threads; OpenVinoSettings fields for
            openvino, e.g. precision='bf16' or threads; device for torch); unknown names are refused here.
        runner_hook: called with (component, active runner) as each runner opens; the runner it
            returns is the one used (`vgrt bench compose` wraps the UNet runners to time their calls).
    """

    source: ModelSource
    backend: str = "onnxruntime"
    dtype: str = "fp32"
    cache: Path | None = None
    progress: bool = True
    runner_options: dict[str, Any] = field(default_factory=dict)
    runner_hook: Callable[[str, Runner], Runner] | None = None
    _runners: dict[tuple[str, str], Runner] = field(default_factory=dict, repr=False)
    _modules: dict[tuple[str, str], torch.nn.Module] = field(default_factory=dict, repr=False)
    _making: dict[tuple[str, str, str], threading.Lock] = field(default_factory=dict, repr=False)  # one per key
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)  # guards _making

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if self.runner_options:  # refused before any export, not at the first runner
            check_settings(self.backend, self.runner_options)
        self.preset: Preset = get_preset(self.source.preset)
        self.tokenizer: PromptTokenizer = load_tokenizer(self.source)

    @classmethod
    def from_preset(cls, preset: str = "tiny", backend: str = "onnxruntime", seed: int = 0, **options) -> "Composer":
        """A preset's architecture with seeded random weights (for parity and speed, not for images)."""
        return cls(ModelSource(preset, seed), backend, **options)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, preset: str = "sd15", backend: str = "onnxruntime", **options
    ) -> "Composer":
        """Real weights from a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, ...)."""
        if not Path(directory).is_dir():
            raise InvalidInputError(f"{str(directory)!r} is not a folder; give a local diffusers model folder")
        return cls(ModelSource(preset, weights=str(directory)), backend, **options)

    def runner(self, component: str, features: str = "none") -> Runner:
        """The active runner of `component` (the UNet with `features`), exported and opened on first use."""
        key = (component, features if component == "unet" else "")
        return self._made_once("runner", self._runners, key, lambda: self._open_runner(*key))

    def _open_runner(self, component: str, features: str) -> Runner:
        settings = ExportSettings(
            preset=self.source.preset, components="unet" if component == "unet" else ENCODERS,
            features=features or "none", dtype=self.dtype, seed=self.source.seed,
            weights=self.source.weights, allow_pickle=self.source.allow_pickle,
        )  # fmt: skip
        directory = cached_export(settings, self.cache)
        runner = open_runner(directory, component, self.backend, **self.runner_options).activate()
        return runner if self.runner_hook is None else self.runner_hook(component, runner)

    def module(self, component: str, features: str = "none") -> torch.nn.Module:
        """The PyTorch module of `component` (fp32, eval, CPU, parameters frozen) for the steps that need
        gradients, which engines do not give; the same weights the engines were exported from."""
        key = (component, features if component == "unet" else "")
        return self._made_once("module", self._modules, key, lambda: self._build_module(*key))

    def _build_module(self, component: str, features: str) -> torch.nn.Module:
        from vgrt.export.components import build_component
        from vgrt.models.features import parse_features

        built = build_component(component, self.source, parse_features(features or "none"), "fp32")
        return built.module.eval().requires_grad_(False)

    def _made_once(self, kind: str, made: dict, key: tuple[str, str], make: Callable[[], Any]) -> Any:
        """made[key], made by `make()` on first use under the key's own lock (a failure is not kept)."""
        found = made.get(key)  # the common case takes no lock: an entry is stored only once complete
        if found is not None:
            return found
        with self._guard:
            lock = self._making.setdefault((kind, *key), threading.Lock())
        with lock:
            if key not in made:
                made[key] = make()
            return made[key]

    def open(self, *components: str) -> None:
        """Export (on first use) and open these encoder/adapter runners now, so a method's stage timer
        measures inference and not a first-use export."""
        for component in components:
            self.runner(component)

    def close(self) -> None:
        """Deactivate the open runners (after the calls in flight); a later use opens them again."""
        with self._guard:
            locks = [(key[1:], lock) for key, lock in self._making.items() if key[0] == "runner"]
        for key, lock in locks:
            with lock:  # waits for a runner being opened now
                runner = self._runners.pop(key, None)
            if runner is not None:
                runner.deactivate()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, component: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One call of an encoder or adapter: inputs cast to the engine's dtypes (fp16 engines take fp16),
        float outputs returned as fp32 for the host-side work."""
        runner = self.runner(component)
        feed = {name: value.to(getattr(torch, runner.spec.input(name).dtype)) for name, value in inputs.items()}
        return {name: out.float() if out.is_floating_point() else out for name, out in runner.infer(feed).items()}

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text context [B, 77, D] (the last hidden state, as SD 1.x and 2.x condition on)."""
        return self.infer("text_encoder", input_ids=self.tokenizer(prompts))["last_hidden_state"]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/f, W/f]."""
        return self.infer("vae_encoder", images=images)["latents"]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]; NaN or infinite pixels (an fp16 VAE overflows) raise NumericalError."""
        from vgrt.errors import NumericalError

        images = self.infer("vae_decoder", latents=latents)["images"]
        if not torch.isfinite(images).all():  # clamp would turn inf into white and keep NaN
            raise NumericalError(
                f"the VAE decoder gave NaN or infinite pixels for finite latents {tuple(latents.shape)}, so no "
                "image is made from them; use fp32 engines rather than fp16, or check the VAE weights"
            )
        return images.clamp(-1, 1)

    def check_image_size(self, width: int, height: int) -> None:
        """Refuse image sizes the preset's engines cannot take, before any engine runs."""
        from vgrt.runtime.images import check_preset_image_size

        check_preset_image_size(self.preset, width, height)
