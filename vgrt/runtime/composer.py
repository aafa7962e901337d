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
from vgrt.models.presets import Preset
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
        calibrated: UNet exports quantised by `vgrt calibrate` (its --out), each run in place of the UNet of
            its feature set; the other components are exported in `dtype` (from_exports: add them to the folders).
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
    calibrated: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        """Every setting is checked here, before any export (the tensorrt backend without TensorRT or a GPU too)."""
        self.engines = EngineSet(
            self._artifacts(), self.backend, self.device, self.attention, self.runner_options, self.runner_hook
        )
        self.device = self.engines.device
        self.preset: Preset = self.source.model_preset()  # a weights folder's own, read from its configs
        self.tokenizer: PromptTokenizer = load_tokenizer(self.source)
        # SDXL's second text encoder has a tokenizer of its own (the same vocabulary, its own padding).
        self.tokenizer_2: PromptTokenizer | None = (
            load_tokenizer(self.source, "tokenizer_2", "text_encoder_2") if self.preset.is_sdxl else None
        )

    def _artifacts(self) -> ExportCache | PrebuiltExports:
        if not self.exports:
            return ExportCache(self.source, self.dtype, self.cache, calibrated=tuple(map(Path, self.calibrated)))
        if self.calibrated:
            raise InvalidInputError("give calibrated UNet exports to Composer.from_exports with the other folders")
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
        cls,
        directory: str | Path,
        preset: str | None = None,
        backend: str = "onnxruntime",
        adapters: tuple[str | Path, ...] = (),
        allow_pickle: bool = False,
        **options,
    ) -> "Composer":
        """Real weights from a local diffusers folder as published (model_index.json, unet/, vae/, text_encoder/,
        tokenizer/, scheduler/; SDXL's text_encoder_2/, tokenizer_2/); its preset is read from its configs.
        `adapters`: the method's adapter checkpoints as published, or folders of them (as `vgrt compose --adapter`);
        `allow_pickle` also reads pickled ones (.bin, .pth), which can run code when loaded."""
        from vgrt.models.adapter_checkpoints import check_source_adapters

        if not Path(directory).is_dir():
            raise InvalidInputError(f"{str(directory)!r} is not a folder; give a local diffusers model folder")
        source = ModelSource(
            preset, weights=str(directory), adapters=tuple(map(str, adapters)), allow_pickle=allow_pickle
        )
        check_source_adapters(source, source.model_preset())  # before any export, as `vgrt compose` does
        return cls(source, backend, **options)

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
        measures inference and not a first-use export. For SDXL, 'text_encoder' opens both text encoders."""
        if self.preset.is_sdxl and "text_encoder" in components:
            components = (*components, "text_encoder_2")
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
        """Text context [B, 77, D]: the last hidden state for SD 1.x and 2.x; for SDXL, both text encoders'
        penultimate hidden states, concatenated. Methods take `text_conditioning`, which has SDXL's other inputs."""
        return self._context(self._encoder_states(*self._token_ids(prompts)))["encoder_hidden_states"]

    def text_conditioning(self, prompts: list[str], width: int, height: int) -> dict[str, torch.Tensor]:
        """The UNet's text inputs for `prompts`, one row each, for an output of width x height pixels, as
        diffusers' pipelines compute them:

        - encoder_hidden_states [B, 77, D]: SD 1.x and 2.x the text encoder's last hidden state; SDXL the
          penultimate hidden states of both encoders, concatenated (768 + 1280 = 2048 for SDXL base).
        - SDXL only: text_embeds [B, P], the second encoder's projected pooled embedding, and time_ids [B, 6]
          (see `time_ids`).

        The unconditional half of guidance is `unconditional` of the empty prompt's inputs.
        """
        return self.token_conditioning(*self._token_ids(prompts), width=width, height=height)

    def token_conditioning(
        self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None, *, width: int, height: int
    ) -> dict[str, torch.Tensor]:
        """`text_conditioning` of token ids [B, L] (input_ids_2: those of SDXL's second tokenizer, by default
        the same), for prompts given as ids (AIComposer's exceptional prompt)."""
        return self.encoder_conditioning(self._encoder_states(input_ids, input_ids_2), width=width, height=height)

    def encoder_conditioning(
        self, states: list[dict[str, torch.Tensor]], *, width: int, height: int
    ) -> dict[str, torch.Tensor]:
        """`text_conditioning` from the text encoders' outputs, one mapping per encoder (two for SDXL) named as
        the text encoder's export outputs (last_hidden_state, penultimate_hidden_state, pooled)."""
        text = self._context(states)
        if self.preset.is_sdxl:
            text["time_ids"] = self.time_ids(width, height, len(text["encoder_hidden_states"]))
        return text

    def time_ids(self, width: int, height: int, rows: int = 1) -> torch.Tensor:
        """SDXL's micro-conditioning [rows, 6]: original size, crop top-left and target size, each as (height,
        width) in pixels, with the defaults of diffusers' StableDiffusionXLPipeline: original = target = the
        output size, crop (0, 0)."""
        row = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=self.device)
        return row.repeat(rows, 1)

    def unconditional(self, empty: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional half of guidance from the empty prompt's text inputs, as diffusers' pipelines make it
        when no negative prompt is given: the empty prompt's encoding (SD 1.x, 2.x); zeros for the context and
        the pooled embedding where the pipeline sets force_zeros_for_empty_prompt (SDXL base does), with the
        time_ids kept."""
        if not self.preset.force_zeros_for_empty_prompt:
            return empty
        return {name: value if name == "time_ids" else torch.zeros_like(value) for name, value in empty.items()}

    def _token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tokenizer(prompts), None if self.tokenizer_2 is None else self.tokenizer_2(prompts)

    def _encoder_states(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None) -> list[dict]:
        states = [self.infer("text_encoder", input_ids=input_ids)]
        if self.preset.is_sdxl:
            states.append(self.infer("text_encoder_2", input_ids=input_ids if input_ids_2 is None else input_ids_2))
        return states

    def _context(self, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not self.preset.is_sdxl:
            return {"encoder_hidden_states": states[0]["last_hidden_state"]}
        first, second = states
        context = torch.cat([first["penultimate_hidden_state"], second["penultimate_hidden_state"]], dim=-1)
        return {"encoder_hidden_states": context, "text_embeds": second["pooled"]}

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
