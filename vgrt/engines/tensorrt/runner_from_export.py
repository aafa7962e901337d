"""The TensorRT runner of an exported component: finds its engine in the cache for this GPU and TensorRT."""

from dataclasses import fields
from pathlib import Path
from typing import Any

from vgrt.engines.tensorrt.build import default_cache_dir, engine_key
from vgrt.engines.tensorrt.cache import EngineCache, load_verified
from vgrt.engines.tensorrt.gpu import current_gpu
from vgrt.engines.tensorrt.library import require_tensorrt
from vgrt.engines.tensorrt.runner import SharedDeviceMemory, TrtRunner, TrtSettings
from vgrt.engines.tensorrt.settings import BuildSettings
from vgrt.errors import ArtifactError
from vgrt.export.manifest import read_manifest


def runner_from_export(
    directory: str | Path,
    component: str = "unet",
    cache_dir: str | Path | None = None,
    shared_memory: SharedDeviceMemory | None = None,
    **settings: Any,
) -> TrtRunner:
    """A TrtRunner (not yet active) for the engine that `vgrt build` made of `component`.

    Keyword settings are BuildSettings fields (which engine: attention, aot, optimization_level) and
    TrtSettings fields (how to run it: cuda_graph, reuse_outputs, device).
    """
    trt = require_tensorrt()
    build_names = {f.name for f in fields(BuildSettings)}
    build = BuildSettings(component=component, **{k: v for k, v in settings.items() if k in build_names})
    build.validate()
    run = TrtSettings(**{k: v for k, v in settings.items() if k not in build_names})
    manifest = read_manifest(directory)
    entry = manifest.component(component)
    key = engine_key(manifest, entry, build, trt.__version__, current_gpu(run.device))
    cache = EngineCache(cache_dir or default_cache_dir(directory))
    if not cache.contains(key):
        raise ArtifactError(
            f"no TensorRT engine of {component} in {str(cache.directory)!r} for TensorRT {key.tensorrt_version} on "
            f"{key.gpu_name} with these settings; build it with: vgrt build {directory} --backend tensorrt "
            f"--attention {build.attention}" + ("" if build.aot else " --jit")
        )
    return TrtRunner(
        lambda: load_verified(cache, key), entry.spec, run, shared_memory, needs_plugin=bool(key.plugin_version)
    )
