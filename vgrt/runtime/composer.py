"""The pipeline object methods use: prompts, images to latents and back, the runners and modules of one
model on one backend and one device.

    composer = Composer.from_preset("tiny", backend="onnxruntime")
    image = mca_ctrl.compose(composer, request).image

The runners come from an engine set (vgrt.engines.engine_set): components are exported into the cache on
first use, each on its own, so a method exports only the components it runs (the UNet per feature set,
carrying only the attention work the method needs); `Composer.from_exports` runs export folders made
beforehand instead. Everything the composer returns lives on its `device`.

Threads: a Composer may be shared by threads; its engine set makes each runner and module once.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch

from vgrt.engines.base import Runner
from vgrt.engines.engine_set import EngineSet, ExportCache, PrebuiltExports
from vgrt.errors import InvalidInputError
from vgrt.models.presets import Preset, get_preset
from vgrt.models.source import ModelSource
from vgrt.models.tokenizer import PromptTokenizer, load_tokenizer


@dataclass
class Composer:
    """One model's pipeline on one backend and device; runners open on first use and stay open.

    Args:
        source: preset and seed, or a local weights folder.
        backend: 'onnxruntime' (default), 'torch', 'openvino' or 'tensorrt' (vgrt.engines.BACKENDS).
        dtype: 'fp32' or 'fp16' engines.
        cache: export cache directory (default: $VGRT_CACHE or ~/.cache/vgrt).
        progress: show progress bars.
        runner_options: keyword settings for every runner it opens, as `open_runner` takes them
            (OrtSettings fields for onnxruntime, e.g. intra_op_threads; OpenVinoSettings fields for
            openvino, e.g. precision='bf16' or threads; TrtSettings fields for tensorrt, e.g. cuda_graph);
            unknown names, and the device, are refused here.
        runner_hook: called with (component, active runner) as each runner opens; the runner it
            returns is the one used (`vgrt bench compose` wraps the UNet runners to time their calls).
        device: 'cpu', 'cuda' or 'cuda:N'; read back as a torch.device (`composer.device`).
        attention: how TensorRT engines run masked attention: 'plugin' (vgrt's kernel, which skips
            masked key tiles) or 'native' (TensorRT's own attention).
        exports: export folders made beforehand (`Composer.from_exports`); nothing is exported then.
    """

    source: ModelSource
    backend: str = "onnxruntime"
    dtype: str = "fp32"
    cache: Path | None = None
    progress: bool = True
    runner_options: dict[str, Any] = field(default_factory=dict)
    runner_hook: Callable[[str, Runner], Runner] | None = None
    device: torch.device | str = "cpu"
    attention: str = "plugin"
    exports: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        """Every setting is checked here, before any export (the tensorrt backend without TensorRT or a GPU too)."""
        self.engines = EngineSet(
            self._artifacts(), self.backend, self.device, self.attention, self.runner_options, self.runner_hook
        )
        self.device = self.engines.device
        self.preset: Preset = get_preset(self.source.preset)
        self.tokenizer: PromptTokenizer = load_tokenizer(self.source)

    def _artifacts(self) -> ExportCache | PrebuiltExports:
        if not self.exports:
            return ExportCache(self.source, self.dtype, self.cache)
        prebuilt = PrebuiltExports.open(self.exports)
        if (prebuilt.source, prebuilt.dtype) != (self.source, self.dtype):
            raise InvalidInputError(
                f"the export folders hold {prebuilt.source} in {prebuilt.dtype}, not the {self.source} in {self.dtype} "
                "asked for; use Composer.from_exports, which takes both from the folders"
            )
        return prebuilt

    @classmethod
    def from_preset(cls, preset: str = "tiny", backend: str = "onnxruntime", seed: int = 0, **options) -> "Composer":
        """A preset's architecture with seeded random weights (for parity and speed, not for images)."""
        return cls(ModelSource(preset, seed), backend, **options)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, preset: str = "sd15", backend: str = "onnxruntime", **options
    ) -> "Composer":
        """Real weights from a local diffusers folder (unet/, vae/, text_encoder/, ...)."""
        if not Path(directory).is_dir():
            raise InvalidInputError(f"{str(directory)!r} is not a folder; give a local diffusers model folder")
        return cls(ModelSource(preset, weights=str(directory)), backend, **options)

    @classmethod
    def from_exports(cls, *folders: str | Path, backend: str = "onnxruntime", **options) -> "Composer":
        """The components of export folders made beforehand (`vgrt export`; for tensorrt, with the engines
        `vgrt build` put in them): runs without exporting, so without the exporter installed."""
        prebuilt = PrebuiltExports.open(folders)
        return cls(prebuilt.source, backend, dtype=prebuilt.dtype, exports=prebuilt.folders, **options)

    def runner(self, component: str, features: str = "none") -> Runner:
        """The active runner of `component` (the UNet with `features`), exported and opened on first use."""
        return self.engines.runner(component, features)

    def module(self, component: str, features: str = "none") -> torch.nn.Module:
        """The PyTorch module of `component` (fp32, eval, on `device`, parameters frozen) for the steps that
        need gradients, which engines do not give; the same weights the engines were made from."""
        return self.engines.module(component, features)

    def open(self, *components: str) -> None:
        """Export (on first use) and open these encoder/adapter runners now, so a method's stage timer
        measures inference and not a first-use export."""
        self.engines.open(*components)

    def close(self) -> None:
        """Deactivate the open runners (after the calls in flight); a later use opens them again."""
        self.engines.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, component: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One call of an encoder or adapter: inputs cast to the engine's dtypes (fp16 engines take fp16),
        outputs on the composer's device, float ones as fp32 for the work between engine calls."""
        runner = self.runner(component)
        feed = {name: value.to(getattr(torch, runner.spec.input(name).dtype)) for name, value in inputs.items()}
        outputs = runner.infer(feed).items()
        return {
            name: out.to(self.device, torch.float32 if out.is_floating_point() else out.dtype) for name, out in outputs
        }

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
