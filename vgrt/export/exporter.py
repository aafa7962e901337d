"""`vgrt export`: conditioned UNet -> ONNX directory with a manifest.

Steps (each a small function): validate every argument and the output location before any work, build
the module, trace it with torch.onnx (dynamo) at sizes distinct per dynamic dim, choose the attention
form, keep the fp16 overflow spots in fp32, compute GroupNormalization in a stable two-pass form
(vgrt.export.group_norm), record every file's size and sha256, write everything atomically with the
manifest last (vgrt.export.staging).
"""

import hashlib
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from tqdm.auto import tqdm

import vgrt
from vgrt._lazy import require
from vgrt.errors import InvalidInputError
from vgrt.export.attention_forms import ATTENTION_FORMS, apply_attention_form, count_custom_nodes
from vgrt.export.blobs import blob_name
from vgrt.export.components import build_component, parse_components
from vgrt.export.fp16 import keep_ops_in_fp32
from vgrt.export.group_norm import decompose_group_norms
from vgrt.export.manifest import write_manifest
from vgrt.export.spec import ComponentSpec
from vgrt.export.staging import atomic_directory, claimed_target
from vgrt.export.verify import FileStamp, remember, stamp_file
from vgrt.library_noise import torch_onnx_warnings_translated
from vgrt.models.adapter_checkpoints import check_source_adapters
from vgrt.models.features import features_text, parse_features
from vgrt.models.source import ModelSource
from vgrt.models.weights import model_sha256
from vgrt.plugins.masked_attention.onnx_form import ATTENTION_OP_MIN_OPSET

log = logging.getLogger(__name__)

DTYPES = {"fp32": ("float32", torch.float32), "fp16": ("float16", torch.float16)}
MIN_OPSET = 18  # the dynamo exporter's opset-17 output fails the ONNX checker
PROTOBUF_LIMIT = 2**31 - 1
WEIGHT_FILE_MIN_BYTES = 1024  # smaller tensors of a large model stay in its graph file


@dataclass(frozen=True)
class ExportSettings:
    """What `vgrt export` writes.

    Args:
        preset: model family (tiny, sd15, sd21, sdxl).
        components: comma-separated components (unet, vae_encoder, vae_decoder, text_encoder,
            text_encoder_2, image_encoder) or 'all'.
        features: conditioning features: names, 'all' or 'none' (see vgrt.models.features).
        opset: ONNX opset; 23 gives the standard Attention op, >= 18 otherwise.
        dtype: 'fp32', or 'fp16' (weights and activations fp16, overflow spots fp32).
        attention_form: 'custom' (vgrt::MaskedAttention + function body), 'attention', 'decomposed'.
        seed: seed of the random weights when no weights path is given.
        weights: local diffusers folder or .safetensors file with real UNet weights.
        allow_pickle: also accept pickled checkpoints (they can run code when loaded).
        adapters: adapter checkpoints as their authors publish them (vgrt.models.adapter_checkpoints).
    """

    preset: str = "tiny"
    components: str = "unet"
    features: str = "none"
    opset: int = 23
    dtype: str = "fp32"
    attention_form: str = "custom"
    seed: int = 0
    weights: str | None = None
    allow_pickle: bool = False
    adapters: tuple[str, ...] = ()

    def validate(self) -> tuple[frozenset[str], tuple[str, ...]]:
        """The parsed features and components; raises on any bad setting before work starts."""
        preset = ModelSource(self.preset, self.seed, self.weights, self.allow_pickle).model_preset()
        components = parse_components(self.components, preset)
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        if self.opset < MIN_OPSET:
            raise InvalidInputError(f"opset {self.opset} is too old; use --opset {MIN_OPSET} or newer (23 recommended)")
        if self.attention_form not in ATTENTION_FORMS:
            raise InvalidInputError(
                f"unknown attention form {self.attention_form!r}; choose one of: {', '.join(ATTENTION_FORMS)}"
            )
        if self.attention_form == "attention" and self.opset < ATTENTION_OP_MIN_OPSET:
            raise InvalidInputError(
                f"--attention attention needs opset >= {ATTENTION_OP_MIN_OPSET}, got --opset {self.opset}; "
                "raise the opset or use --attention decomposed"
            )
        if self.weights and not Path(self.weights).exists():
            raise InvalidInputError(f"weights path {self.weights!r} does not exist")
        if self.adapters:  # adapters that do not fit the base model, refused from their shapes
            source = ModelSource(self.preset, self.seed, self.weights, self.allow_pickle, self.adapters)
            check_source_adapters(source, preset)
        return parse_features(self.features), components


def trace_sizes(spec: ComponentSpec) -> dict[str, int]:
    """Sizes for tracing: inside the profile, >= 2 (torch.export specializes 0 and 1) and distinct per
    dim, so that no two dynamic dims are mistaken for one."""
    sizes, taken = {}, set()
    for name, r in spec.dims.items():
        step = spec.multiple_of.get(name, 1)
        size = max(r.opt, 2 * step, 2)
        size -= size % step
        while size in taken and size + step <= r.max:
            size += step
        sizes[name] = size
        taken.add(size)
    return sizes


def _dynamic_shapes(spec: ComponentSpec) -> dict[str, dict[int, object]]:
    dims: dict[str, object] = {}
    for name, r in spec.dims.items():
        step = spec.multiple_of.get(name, 1)
        if step > 1:
            dims[name] = step * torch.export.Dim(f"{name}_div{step}", min=max(1, -(-r.min // step)), max=r.max // step)
        else:
            dims[name] = torch.export.Dim(name, min=r.min, max=r.max)
    return {t.name: {a: dims[d] for a, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs}


def trace_to_onnx(module: torch.nn.Module, spec: ComponentSpec, opset: int) -> onnx.ModelProto:
    from vgrt.export.feeds import random_feed

    feed = random_feed(spec, trace_sizes(spec), seed=0)
    program = torch.onnx.export(
        module,
        (),
        kwargs=feed,
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=_dynamic_shapes(spec),
        output_names=[t.name for t in spec.outputs],
        optimize=True,
        verbose=False,
    )
    return program.model_proto


def export(out: str | Path, settings: ExportSettings = ExportSettings()) -> Path:
    """Export the components of `settings` into directory `out`; return `out`.

    `out` is replaced atomically when it is a vgrt export; a file, a foreign folder or an export holding
    files vgrt did not write is refused before any work. A second export to `out` waits for the first.
    """
    settings.validate()
    for package in ("onnxscript", "onnxruntime"):  # needed only after the model is built: check now
        require(package)
    out = Path(out)
    with claimed_target(out):
        return write_export(out, settings)


def write_export(out: Path, settings: ExportSettings) -> Path:
    """Write the export of `settings` to `out`, replacing it; the caller holds `target_lock(out)` and
    has checked that `out` may be replaced."""
    features, components = settings.validate()
    source = ModelSource(settings.preset, settings.seed, settings.weights, settings.allow_pickle, settings.adapters)
    started = time.perf_counter()
    entries, stamps = {}, {}
    with atomic_directory(out) as staging:
        progress = tqdm(components, desc="export", unit="component", disable=len(components) == 1)
        level = logging.INFO if progress.disable else logging.DEBUG  # with a bar, the bar names the component
        for name in progress:
            progress.set_postfix_str(name)
            log.log(level, "tracing %s to ONNX opset %d, %s (the slow step)", name, settings.opset, settings.dtype)
            entries[name], written = _export_component(name, source, features, settings, staging)
            stamps.update(written)
        log.debug("writing %s", out)
        remember(staging, stamps)  # hashed while writing: the first open only stats the files
        write_manifest(
            staging,
            {
                "preset": settings.preset,
                "source": {
                    "seed": settings.seed,
                    "weights": settings.weights,
                    "allow_pickle": settings.allow_pickle,
                    "adapters": list(settings.adapters),
                },
                "settings": {
                    "opset": settings.opset,
                    "dtype": settings.dtype,
                    "attention_form": settings.attention_form,
                },
                "components": entries,
                "versions": _versions(),
            },
        )
    log.info(
        "exported %s (%s) to %s in %.1f s", ", ".join(components), settings.dtype, out, time.perf_counter() - started
    )
    return out


def _export_component(
    name: str, source: ModelSource, features: frozenset[str], settings: ExportSettings, staging: Path
) -> tuple[dict[str, object], dict[str, FileStamp]]:
    """Trace, transform and save one component; return its manifest entry and the stamps of its files."""
    dtype_name, torch_dtype = DTYPES[settings.dtype]
    features = features if name == "unet" else frozenset()
    log.debug("building %s of %s (features: %s)", name, settings.preset, features_text(features))
    built = build_component(name, source, features, dtype_name)
    fingerprint = model_sha256(built.module)
    with torch_onnx_warnings_translated(name):
        model = trace_to_onnx(built.module.to(torch_dtype), built.spec, settings.opset)
        spec_json = built.spec.to_json()
        del built  # the weights now live in `model`; keep one copy in memory, not two
        masked_nodes = count_custom_nodes(model)
        fp32_ops = _apply_graph_passes(model, settings)
        path = staging / f"{name}.onnx"
        stamps = _save(model, path)
    return {
        "file": path.name,
        "spec": spec_json,
        "features": sorted(features),
        "fp32_ops": fp32_ops,
        "attention_form": settings.attention_form,
        "masked_attention_nodes": masked_nodes,
        "model_sha256": fingerprint,
        "onnx_sha256": stamps[path.name].sha256,
        "files": {file: {"bytes": stamp.bytes, "sha256": stamp.sha256} for file, stamp in stamps.items()},
    }, stamps


def _apply_graph_passes(model: onnx.ModelProto, settings: ExportSettings) -> list[str]:
    """Run the fp16, GroupNormalization and attention-form passes on a weightless copy of `model` and take its structure
    back: the passes serialize the model, which protobuf refuses above 2 GB (an SD UNet in fp32)."""
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    for field in ("node", "input", "output", "value_info"):
        getattr(skeleton.graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:  # dtype and shape only, for shape inference
        stub = skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="weights-not-loaded")
    fp32_ops = keep_ops_in_fp32(skeleton) if settings.dtype == "fp16" else []
    decompose_group_norms(skeleton)  # after the fp16 pass: its casts around the node then enclose the new ops
    skeleton = apply_attention_form(skeleton, settings.attention_form)
    for field in ("node", "value_info"):
        model.graph.ClearField(field)
        getattr(model.graph, field).extend(getattr(skeleton.graph, field))
    for field in ("functions", "opset_import"):
        model.ClearField(field)
        getattr(model, field).extend(getattr(skeleton, field))
    return fp32_ops


def _save(model: onnx.ModelProto, path: Path) -> dict[str, FileStamp]:
    """Save `model` to `path`; return the stamps of the files written. A model too large for one protobuf
    (SD UNets, text encoders) keeps each tensor of WEIGHT_FILE_MIN_BYTES or more in its own file named by
    its sha256, so that exports holding the same tensors (the UNet's feature sets, whose folded constants
    get other names per export) hold the same files, which the export cache stores once (vgrt.export.blobs)."""
    large = sum(len(t.raw_data) for t in model.graph.initializer) > PROTOBUF_LIMIT // 2
    stamps = _move_weights_to_files(model, path.parent) if large else {}
    onnx.save_model(model, path)
    return {path.name: stamp_file(path), **stamps}


def _move_weights_to_files(model: onnx.ModelProto, folder: Path) -> dict[str, FileStamp]:
    """Write each large initializer's bytes to `folder/<sha256>.bin` (once per content) and point the
    initializer at it; return the stamps of the files written (hashed here, not read back)."""
    stamps = {}
    for tensor in model.graph.initializer:
        data = tensor.raw_data
        if len(data) < WEIGHT_FILE_MIN_BYTES:
            continue
        sha256 = hashlib.sha256(data).hexdigest()
        name = blob_name(sha256)
        if name not in stamps:
            file = folder / name
            file.write_bytes(data)
            stat = file.stat()
            stamps[name] = FileStamp(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, sha256)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=name)
        tensor.external_data.add(key="length", value=str(len(data)))
    return stamps


def _versions() -> dict[str, str]:
    import diffusers
    import onnxruntime

    return {
        "vgrt": vgrt.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
