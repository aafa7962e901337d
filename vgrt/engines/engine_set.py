"""An engine set: one model's runners on one backend and one device, from one source of artifacts.

    engines = EngineSet(ExportCache(ModelSource("tiny")), backend="onnxruntime")
    unet = engines.runner("unet", "mutual")

Artifacts come from the export cache (`ExportCache`: each component exported on first use into its own
entry, the UNet one per feature set, so a method exports only what it runs; a UNet calibrated by
`vgrt calibrate` runs in place of the UNet of its feature set) or from export folders made
beforehand (`PrebuiltExports`: a deployment ships its exports, and for TensorRT their engines under
`<export>/tensorrt/`, and runs without the exporter).

Backends:
- torch runs the weights themselves, no export: its runner and `module()` share one module (fp32), so
  the process holds one copy of the weights.
- onnxruntime and openvino run the component's export.
- tensorrt runs the export's engine, found in or built into the engine cache (keyed by everything the
  engine depends on, vgrt.engines.tensorrt.cache) under a lock, so that concurrent processes build it
  once; a prebuilt folder must hold its engine. The set's TensorRT runners share one activation buffer.
  Without TensorRT or a CUDA GPU the set is refused when made, before any export.

Threads: an engine set may be shared by threads. Runners and modules are made once per key: a second
thread asking for one being made waits for it and reuses it, while other keys are made in parallel; the
runners themselves take concurrent calls (vgrt.engines.base).
"""

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vgrt.engines import BACKENDS, check_settings, open_runner
from vgrt.engines.base import Runner
from vgrt.engines.tensorrt.settings import ATTENTION_ROUTES  # imports neither TensorRT nor Polygraphy
from vgrt.engines.torch_runner import TorchRunner
from vgrt.errors import ArtifactError, InvalidInputError, MissingDependencyError
from vgrt.export.manifest import QUANTISED, Manifest, read_manifest
from vgrt.models.features import parse_features
from vgrt.models.source import ModelSource

DEVICE_TYPES = ("cpu", "cuda")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# Runner settings the engine set decides for all its runners; given per runner they would contradict it.
OWN_SETTINGS = {
    "device": "give the device to the engine set (Composer(device=...), --device)",
    "device_id": "give the device to the engine set (Composer(device='cuda:N'), --device cuda:N)",
    "shared_memory": "the engine set shares one activation buffer among its TensorRT runners itself",
    "attention": "give the attention route to the engine set (Composer(attention=...), --attention)",
    "cache_dir": "engines are kept beside their export, in its tensorrt/ folder",
}


@dataclass(frozen=True)
class ExportCache:
    """Exports made on first use in the export cache (vgrt.export.cache), one entry per component and,
    for the UNet, per feature set; `calibrated`: quantised UNet exports (`vgrt calibrate --out`), each
    used for the UNet of its feature set in place of an export (UNets of other feature sets, such as an
    inversion's plain UNet, and the other components are exported in `dtype`)."""

    source: ModelSource
    dtype: str = "fp32"
    root: Path | None = None
    builds: bool = True  # TensorRT engines are built on first use too
    calibrated: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_calibrated_unets", calibrated_unets(self.calibrated, self.source))

    def export(self, component: str, features: str) -> Path:
        from vgrt.export import cache
        from vgrt.export.exporter import ExportSettings
        from vgrt.models.adapter_checkpoints import reads_adapters

        if component == "unet" and self.calibrated:
            found = self._calibrated_unets.get(parse_features(features))
            if found is not None:
                return found
        settings = ExportSettings(
            preset=self.source.preset, components=component, features=features, dtype=self.dtype,
            seed=self.source.seed, weights=self.source.weights, allow_pickle=self.source.allow_pickle,
            adapters=self.source.adapters if self.source.adapters and reads_adapters(component, features) else (),
        )  # fmt: skip
        return cache.cached_export(settings, self.root)


@dataclass(frozen=True)
class PrebuiltExports:
    """Export folders made beforehand (`vgrt export`; TensorRT engines by `vgrt build`): nothing is exported
    or built, so a deployment needs neither the exporter nor the TensorRT builder."""

    folders: tuple[Path, ...]
    source: ModelSource
    dtype: str
    builds: bool = False

    @classmethod
    def open(cls, folders: Sequence[str | Path]) -> "PrebuiltExports":
        """Read every folder's manifest now; refuse folders of different models or dtypes."""
        from vgrt.export.manifest import read_manifest

        if not folders:
            raise InvalidInputError("no export folders given; give at least one folder made by `vgrt export`")
        made = {}
        for folder in map(Path, folders):
            data = read_manifest(folder).data
            source = ModelSource(data["preset"], **data["source"])
            made[folder] = (source, data["settings"]["dtype"])
        (first, origin), *others = made.items()
        for folder, model in others:
            if model != origin:
                raise InvalidInputError(
                    f"the export folders {str(first)!r} and {str(folder)!r} hold different models or dtypes "
                    f"({_describe(*origin)} and {_describe(*model)}); give folders exported from one model in one dtype"
                )
        return cls(tuple(made), *origin)

    def export(self, component: str, features: str) -> Path:
        from vgrt.export.manifest import read_manifest

        wanted = parse_features(features) if component == "unet" else frozenset()
        held = []
        for folder in self.folders:
            entries = read_manifest(folder).data["components"]
            if component in entries and frozenset(entries[component]["features"]) == wanted:
                return folder
            held += [_held(name, entry) for name, entry in entries.items()]
        what = f"the unet with features {features!r}" if component == "unet" else component
        raise ArtifactError(
            f"none of the export folders ({', '.join(map(str, self.folders))}) holds {what}; they hold: "
            f"{', '.join(held)}; export it with `vgrt export --components {component}"
            + (f" --features {features}" if component == "unet" else "")
            + "` and add that folder"
        )


def check_calibrated(folders: Sequence[str | Path], backend: str) -> None:
    """Refuse folders that are not quantised UNet exports, or that `backend` does not open (reads manifests only)."""
    for folder in folders:
        _quantised_unet(Path(folder)).check_backend(backend)


def calibrated_unets(folders: Sequence[Path], source: ModelSource) -> dict[frozenset[str], Path]:
    """{UNet feature set: folder} of quantised UNet exports of `source`'s model; anything else is refused."""
    unets = {}
    for folder in map(Path, folders):
        manifest = _quantised_unet(folder)
        made = manifest.data["source"]
        if not _same_weights(manifest.data["preset"], made["seed"], made["weights"], source):
            weights = made["weights"] or f"random, seed {made['seed']}"
            raise InvalidInputError(
                f"{str(folder)!r} quantises {manifest.data['preset']} ({weights}), not the model composed here "
                f"({_model(source)}); calibrate this model, or compose the one it quantises"
            )
        features = frozenset(manifest.components["unet"].features)
        if features in unets:
            raise InvalidInputError(
                f"{str(unets[features])!r} and {str(folder)!r} both quantise the UNet with features "
                f"{', '.join(sorted(features)) or 'none'}; give one of them"
            )
        unets[features] = folder
    return unets


def _same_weights(preset: str, seed: int, weights: str | None, source: ModelSource) -> bool:
    """Whether an export of `preset` with these weights (a folder, else seeded random ones) is `source`'s
    model; a source without a preset takes its folder's."""
    if source.preset is not None and source.preset != preset:
        return False
    if weights is None or source.weights is None:
        return weights is None and source.weights is None and seed == source.seed
    return Path(weights).resolve() == Path(source.weights).resolve()


def _quantised_unet(folder: Path) -> Manifest:
    manifest = read_manifest(folder)
    if manifest.precision not in QUANTISED or "unet" not in manifest.components:
        raise InvalidInputError(
            f"{str(folder)!r} is an {manifest.precision} export of {', '.join(manifest.components)}, not a quantised "
            "UNet; give the --out folder of `vgrt calibrate`"
        )
    return manifest


def _describe(source: ModelSource, dtype: str) -> str:
    return f"{_model(source)} in {dtype}"


def _model(source: ModelSource) -> str:
    return f"{source.preset} ({source.weights or f'random, seed {source.seed}'})"


def _held(name: str, entry: dict[str, Any]) -> str:
    return f"unet ({', '.join(entry['features']) or 'none'})" if name == "unet" else name


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device ('cuda' is device 0); refused when unknown."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"unknown device {device!r}; give 'cpu', 'cuda' or 'cuda:N'") from err
    if parsed.type not in DEVICE_TYPES:
        raise InvalidInputError(f"device {device!r} is not supported; give 'cpu', 'cuda' or 'cuda:N'")
    return torch.device("cuda", 0) if parsed.type == "cuda" and parsed.index is None else parsed


def check_backend_device(backend: str, device: torch.device) -> None:
    """Refuse a backend that cannot run on `device`, or a device this machine lacks, naming the fix.
    The tensorrt backend is checked library first, so a machine without it is told what to install."""
    if backend == "tensorrt":
        from vgrt._lazy import require
        from vgrt.engines.tensorrt.library import require_tensorrt

        require_tensorrt()
        require("polygraphy")  # the engine builder
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MissingDependencyError(
            f"device {str(device)!r} needs a CUDA GPU, and torch {torch.__version__} sees none (a CPU build of torch, "
            "or no NVIDIA driver); install a CUDA build of torch on a machine with an NVIDIA GPU, or use device 'cpu'"
        )
    if backend == "tensorrt" and device.type != "cuda":
        raise InvalidInputError(f"the tensorrt backend runs on a CUDA GPU, not on {str(device)!r}; give device 'cuda'")
    if backend == "openvino" and device.type != "cpu":
        raise InvalidInputError(f"the openvino backend runs on the CPU, not on {str(device)!r}; give device 'cpu'")


@dataclass
class EngineSet:
    """Runners of one model on one backend and one device; each opens on first use and stays open.

    Args:
        artifacts: `ExportCache` or `PrebuiltExports`.
        backend: 'onnxruntime', 'torch', 'openvino' or 'tensorrt' (vgrt.engines.BACKENDS).
        device: 'cpu', 'cuda' or 'cuda:N'; every runner and module of the set runs there.
        attention: the TensorRT attention route, 'plugin' (vgrt's kernel) or 'native' (TensorRT's own).
        runner_options: keyword settings for every runner, as `open_runner` takes them, less those the set
            owns (OWN_SETTINGS); unknown names are refused here.
        runner_hook: called with (component, active runner) as each runner opens; the runner it returns
            is the one used (`vgrt bench compose` wraps the UNet runners to time their calls).
    """

    artifacts: ExportCache | PrebuiltExports
    backend: str = "onnxruntime"
    device: torch.device | str = "cpu"
    attention: str = "plugin"
    runner_options: dict[str, Any] = field(default_factory=dict)
    runner_hook: Callable[[str, Runner], Runner] | None = None
    _runners: dict[tuple[str, str], Runner] = field(default_factory=dict, repr=False)
    _built: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)  # BuiltComponent per key
    _making: dict[tuple[str, str, str], threading.Lock] = field(default_factory=dict, repr=False)  # one per key
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)  # guards _making
    _shared_memory: Any = field(default=None, repr=False)  # the TensorRT runners' activation buffer

    def __post_init__(self) -> None:
        """Every setting is checked here, before any export or build."""
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if self.attention not in ATTENTION_ROUTES:
            raise InvalidInputError(
                f"unknown attention route {self.attention!r}; choose one of: {', '.join(ATTENTION_ROUTES)}"
            )
        self.device = parse_device(self.device)
        owned = sorted(set(self.runner_options) & set(OWN_SETTINGS))
        if owned:
            raise InvalidInputError(f"runner setting {owned[0]!r} is not taken per runner: {OWN_SETTINGS[owned[0]]}")
        if self.runner_options:
            check_settings(self.backend, self.runner_options)
        check_calibrated(getattr(self.artifacts, "calibrated", ()), self.backend)
        check_backend_device(self.backend, self.device)
        if self.backend == "onnxruntime":
            _check_provider(self.runner_options.get("provider"), self.device)
        if self.backend == "tensorrt":
            from vgrt.engines.tensorrt.runner import SharedDeviceMemory

            self._shared_memory = SharedDeviceMemory(self.device.index)

    def runner(self, component: str, features: str = "none") -> Runner:
        """The active runner of `component` (the UNet with `features`), exported and opened on first use."""
        key = (component, features if component == "unet" else "none")
        return self._made_once("runner", self._runners, key, lambda: self._open_runner(*key))

    def module(self, component: str, features: str = "none") -> torch.nn.Module:
        """The PyTorch module of `component` (fp32, eval, parameters frozen, on the set's device) for the
        steps that need gradients, which engines do not give; the weights the engines were made from.
        On the torch backend in fp32 it is the module the runner runs."""
        key = (component, features if component == "unet" else "none")
        return self._made_once("module", self._built, key, lambda: self._build(*key)).module

    def open(self, *components: str) -> None:
        """Export (on first use) and open these encoder/adapter runners now."""
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

    def _build(self, component: str, features: str) -> Any:
        from vgrt.export import components

        built = components.build_component(component, self.artifacts.source, parse_features(features), "float32")
        built.module.eval().requires_grad_(False).to(self.device)
        return built

    def _open_runner(self, component: str, features: str) -> Runner:
        if self.backend == "torch":
            runner = self._torch_runner(component, features)
        elif self.backend == "tensorrt":
            runner = self._tensorrt_runner(component, features)
        else:
            directory = self.artifacts.export(component, features)
            runner = open_runner(directory, component, self.backend, **self._backend_settings(component))
        runner.activate()
        return runner if self.runner_hook is None else self.runner_hook(component, runner)

    def _backend_settings(self, component: str) -> dict[str, Any]:
        if self.backend == "onnxruntime" and self.device.type == "cuda":
            return {"provider": "cuda", **self.runner_options, "device_id": self.device.index}
        if self.backend == "openvino":
            # Static shapes pay where a model runs every step (SD 1.5's UNet: 5%) and cost a compiled model and
            # a cache blob per shape; the components that run once or twice per image gained 1-2%.
            return {"static_shapes": component == "unet", **self.runner_options}
        return self.runner_options

    def _torch_runner(self, component: str, features: str) -> Runner:
        """fp32: the runner runs `module()`'s module; fp16: a half copy of its own (the gradient steps
        need fp32 weights)."""
        if self.artifacts.dtype == "fp32":
            built = self._made_once(
                "module", self._built, (component, features), lambda: self._build(component, features)
            )
            return SharedModuleRunner(built.module, built.spec, device=self.device, **self.runner_options)
        from vgrt.export import components

        built = components.build_component(component, self.artifacts.source, parse_features(features), "float16")
        return TorchRunner(built.module, built.spec, device=self.device, dtype=torch.float16, **self.runner_options)

    def _tensorrt_runner(self, component: str, features: str) -> Runner:
        from vgrt.engines.tensorrt.runner_from_export import runner_from_export

        directory = self.artifacts.export(component, features)
        # The step loops call each engine at one shape per run: replaying a CUDA graph saves the launches.
        settings = {"attention": self.attention, "cuda_graph": True, **self.runner_options}
        if self.artifacts.builds:
            _build_engine_once(directory, component, settings)
        return runner_from_export(
            directory, component, shared_memory=self._shared_memory, device=self.device.index, **settings
        )


class SharedModuleRunner(TorchRunner):
    """A TorchRunner over the engine set's module, which is back where the set put it when the runner closes
    (`module()` hands it out too)."""

    def deactivate_impl(self) -> None:
        super().deactivate_impl()  # TorchRunner's own release (it moves the module to the CPU) ...
        self.module.to(self.device)  # ... undone: the module is the set's, not the runner's


def _check_provider(provider: str | None, device: torch.device) -> None:
    on_gpu = provider in ("cuda", "tensorrt")
    if provider is not None and on_gpu != (device.type == "cuda"):
        raise InvalidInputError(
            f"the onnxruntime provider {provider!r} does not run on device {str(device)!r}; leave the provider out "
            "(the device chooses it) or give a matching device"
        )


def _build_engine_once(directory: Path, component: str, settings: dict[str, Any]) -> Path:
    """Find or build the engine of `component` under a lock beside the engines, so that processes needing
    one engine build it once and the others find it (the cache checks and stores it atomically)."""
    from dataclasses import fields

    from vgrt.engines.tensorrt.build import build_engine, default_cache_dir
    from vgrt.engines.tensorrt.settings import BuildSettings
    from vgrt.export.staging import target_lock

    names = {f.name for f in fields(BuildSettings)}
    engine = BuildSettings(component=component, **{k: v for k, v in settings.items() if k in names})
    engines = default_cache_dir(directory)
    engines.mkdir(parents=True, exist_ok=True)
    with target_lock(engines / component):
        return build_engine(directory, engine)
