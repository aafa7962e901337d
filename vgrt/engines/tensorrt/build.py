"""`vgrt build --backend tensorrt`: an exported component -> a cached, strongly typed TensorRT engine.

Steps, each a small loader in Polygraphy's `<Target>From<Source>` style:
1. `OnnxPathFromExport`: the ONNX in the form of the attention route, written beside the export (it
   shares the export's external weights): plugin nodes (`vgrt.export.plugin_form`) or the ONNX
   Attention op (`apply_attention_form(..., "attention")`).
2. `EngineBytesFromOnnxPath`: Polygraphy parses it into a strongly typed network (TensorRT 11 takes
   every precision from the graph: an fp16 export gives an fp16 engine, the Q/DQ export of
   `vgrt calibrate --target tensorrt` an INT8 or FP8 one, with no precision flag: TensorRT's explicit
   quantization is used with strong typing and takes none), adds one optimisation profile
   from the spec, reuses and extends the timing cache, and builds.
3. The engine cache stores the engine under a key of everything it depends on; a valid cached engine
   is reused, a stale or corrupt one rebuilt.
"""

import hashlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

from vgrt._lazy import require
from vgrt.engines.tensorrt.cache import EngineCache, EngineKey, write_atomically
from vgrt.engines.tensorrt.gpu import Gpu, current_gpu
from vgrt.engines.tensorrt.library import require_tensorrt
from vgrt.engines.tensorrt.profiles import profile_from_spec
from vgrt.engines.tensorrt.settings import BuildSettings
from vgrt.errors import InvalidInputError, VgrtError
from vgrt.export.manifest import ComponentEntry, Manifest, read_manifest
from vgrt.export.spec import ComponentSpec

log = logging.getLogger(__name__)


def default_cache_dir(directory: str | Path) -> Path:
    return Path(directory) / "tensorrt"


def plugin_version() -> str:
    """The plugin's declared version plus a digest of its kernel sources: an AOT engine embeds the
    kernel, so an edited kernel must not reuse engines built with the old one."""
    from vgrt.plugins.masked_attention import triton_kernel, trt_plugin
    from vgrt.plugins.masked_attention.trt_plugin import MASKED_ATTENTION

    sources = "".join(inspect.getsource(module) for module in (trt_plugin, triton_kernel))
    return f"{MASKED_ATTENTION.version}+{hashlib.sha256(sources.encode()).hexdigest()[:12]}"


def engine_key(
    manifest: Manifest, entry: ComponentEntry, settings: BuildSettings, tensorrt_version: str, gpu: Gpu
) -> EngineKey:
    exported = manifest.data["components"][entry.name]
    uses_plugin = settings.attention == "plugin" and exported["masked_attention_nodes"] > 0
    return EngineKey(
        component=entry.name,
        onnx_sha256=exported["onnx_sha256"],
        tensorrt_version=tensorrt_version,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        profile=tuple((name, *shapes) for name, shapes in entry.spec.profile_shapes().items()),
        plugin_version=plugin_version() if uses_plugin else "",
        build=tuple(sorted(settings.engine_fields().items())),
    )


@dataclass(frozen=True)
class OnnxPathFromExport:
    """The component's ONNX in the form of `settings.attention`; the export itself when no rewrite is due."""

    manifest: Manifest
    entry: ComponentEntry
    settings: BuildSettings

    def __call__(self) -> Path:
        import onnx  # here, not at import: a deployment that runs prebuilt engines needs no onnx

        from vgrt.export.attention_forms import apply_attention_form, count_custom_nodes
        from vgrt.export.plugin_form import to_plugin_form

        source = self.manifest.path(self.entry)
        if self.settings.attention == "plugin" and self.entry.attention_form != "custom":
            raise InvalidInputError(
                f"--attention plugin needs an export in the 'custom' attention form (vgrt::MaskedAttention nodes); "
                f"{str(self.manifest.directory)!r} has the {self.entry.attention_form!r} form: export again with "
                "--attention custom, or build with --attention native"
            )
        model = onnx.load(source, load_external_data=False)  # structure only; weights stay where they are
        if count_custom_nodes(model) == 0:
            return source
        if self.settings.attention == "plugin":
            model = to_plugin_form(model, aot=self.settings.aot)
            name = "plugin-aot" if self.settings.aot else "plugin-jit"
        else:
            model, name = apply_attention_form(model, "attention"), "native"
        # Beside the source, so that relative external-data locations still resolve.
        target = source.with_name(f"{source.stem}.trt-{name}.onnx")
        write_atomically(target, model.SerializeToString())
        return target


@dataclass(frozen=True)
class EngineBytesFromOnnxPath:
    """A serialized strongly typed engine, built by Polygraphy's loaders from an ONNX file."""

    path: Path
    spec: ComponentSpec
    timing_cache: Path
    optimization_level: int = 3

    def __call__(self):
        loaders = require("polygraphy.backend.trt")
        from polygraphy.exception import PolygraphyException

        network = loaders.NetworkFromOnnxPath(str(self.path), strongly_typed=True)
        config = loaders.CreateConfig(
            profiles=[profile_from_spec(self.spec)],
            load_timing_cache=str(self.timing_cache),  # a missing file starts an empty cache
            builder_optimization_level=self.optimization_level,
        )
        try:
            return loaders.EngineBytesFromNetwork(network, config, save_timing_cache=str(self.timing_cache))()
        except PolygraphyException as err:
            raise VgrtError(f"TensorRT could not build an engine from {str(self.path)!r}: {err}") from err


def check_export_precision(manifest: Manifest, precision: str | None) -> None:
    """Refuse an export TensorRT cannot build (a CPU INT8 one: asymmetric), or one not of `precision`:
    a strongly typed network takes every precision from the graph, INT8 and FP8 from its Q/DQ nodes."""
    manifest.check_backend("tensorrt")
    if precision is None or precision == manifest.precision:
        return
    if precision in ("int8", "fp8"):
        fix = (
            f"calibrate one with `vgrt calibrate METHOD --target tensorrt --precision {precision} --out DIR` "
            "and build DIR"
        )
    else:
        fix = f"export one with `vgrt export --precision {precision}` and build that"
    raise InvalidInputError(
        f"--precision {precision}: {str(manifest.directory)!r} is an {manifest.precision} export, and TensorRT "
        f"builds an engine in its export's precision; {fix}"
    )


def build_engine(
    directory: str | Path,
    settings: BuildSettings = BuildSettings(),
    cache_dir: str | Path | None = None,
    precision: str | None = None,
) -> Path:
    """Build (or find in the cache) the engine of `settings.component` of an exported directory; return its path.
    The engine's precision is the export's (`precision`, when given, is checked against it)."""
    trt = require_tensorrt()
    require("polygraphy")
    settings.validate()
    manifest = read_manifest(directory)
    check_export_precision(manifest, precision)
    entry = manifest.component(settings.component)
    if manifest.data["settings"]["dtype"] != "fp16":
        log.warning("%s is exported in %s, so its engine will be too; export with --precision fp16 for an fp16 engine",
                    entry.name, manifest.data["settings"]["dtype"])  # fmt: skip
    manifest.path(entry)  # the key names the ONNX by its hash: every file it reads must be the exported one
    key = engine_key(manifest, entry, settings, trt.__version__, current_gpu())
    cache = EngineCache(cache_dir or default_cache_dir(directory))
    if cache.load(key) is not None:
        log.info("engine up to date: %s", cache.engine_path(key))
        return cache.engine_path(key)
    onnx_path = OnnxPathFromExport(manifest, entry, settings)()
    if key.plugin_version:
        from vgrt.plugins.masked_attention.trt_plugin import register_plugin

        register_plugin()  # the parser looks plugins up in the registry
    log.info("building %s %s engine from %s (attention: %s)", manifest.precision, entry.name, onnx_path.name,
             settings.attention)  # fmt: skip
    engine = EngineBytesFromOnnxPath(onnx_path, entry.spec, cache.timing_cache_path(key), settings.optimization_level)()
    return cache.store(key, engine)
