"""OpenVINO runner: the CPU plugin over vgrt's ONNX exports, compiled once and cached on disk.

The model OpenVINO reads is prepared from the export in a cache folder keyed by the export's content
(the manifest's sha256 of every file the component reads), the settings and the OpenVINO version:
- OpenVINO refuses the custom `vgrt::MaskedAttention` node, so its model-local function is inlined;
- OpenVINO's CPU ReduceMax gives the lowest finite float, not -inf, on a row whose keys are all -inf,
  which turns the NaN-free masked softmax into 0/0: the "every key is masked" test is rewritten into an
  exact form that reads no reduction of -inf (`guard_masked_rows`);
- external weights are hard-linked, not copied, beside the prepared model (a model that needs no change
  is itself a link to the export's file); a cache on another file system gets copies.
OpenVINO's own compiled-model cache (CACHE_DIR) lives in the same folder, so a second open compiles
nothing again: a dynamic model is read from its blob alone, a static one (one blob per shape) after
the ONNX graph is read to be reshaped.

Each call holds an InferRequest from the runner's pool (vgrt.engines.contexts): OpenVINO runs one
compiled model from many threads when each has its own request, so concurrent calls give the serial
results. Inputs are shared with OpenVINO (an ov.Tensor over the feed's memory) and OpenVINO writes the
outputs straight into torch tensors bound as its output tensors: a call copies nothing on the host.
"""

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vgrt._lazy import require
from vgrt.engines.base import Runner
from vgrt.engines.contexts import ContextPool
from vgrt.errors import ArtifactError, InvalidInputError
from vgrt.export.spec import ComponentSpec

log = logging.getLogger(__name__)

# precision setting -> OpenVINO's INFERENCE_PRECISION_HINT, and the CPU capability it needs. The hint is
# always set: on a CPU with bf16 units OpenVINO defaults to bf16, which breaks fp32 parity.
PRECISIONS = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16")}
# Bumped when the preparation of the model changes, so older prepared models are not reused.
PREPARATION_VERSION = 1
CACHE_FOLDER = "openvino"  # the default cache, inside the export directory (like vgrt build's TensorRT engines)


@dataclass(frozen=True)
class OpenVinoSettings:
    """OpenVINO compile settings.

    Args:
        precision: 'fp32' or 'bf16', the CPU plugin's inference precision. bf16 needs a CPU with bf16
            units (AVX512_BF16, AMX), and pays only where they are fast: on SD 1.5 it ran 1.9x faster than
            fp32 on an AMD EPYC (DESIGN.md section 6) and 1.3x slower on an Intel Xeon without AMX (README,
            Performance); relative error about 2.3e-2 against PyTorch. The tiny preset gains nothing.
        threads: inference threads (INFERENCE_NUM_THREADS); 0 lets OpenVINO choose (all cores).
        static_shapes: True (the default) compiles the first call's shapes into a static model, and a call
            with other shapes into one dynamic model made on its first such call; a mapping of every input
            name to its shape compiles for those shapes only, up front, and refuses other shapes; False
            compiles one dynamic model for any shape the export allows. A method's run has fixed shapes,
            and static ones ran the SD 1.5 UNet 5% faster and its VAE decoder 2% (README, Performance); a
            compiled model holds its own copy of the weights (about 7 GB for SD 1.5's UNet), so a runner
            holds at most two.
        cache_dir: where prepared and compiled models are kept; None: an `openvino` folder inside the
            export directory. Each export content, precision and threads get a folder of their own in it.
        reuse_outputs: return output buffers the runner keeps and overwrites on a later call (one caller
            only; see vgrt.engines.base). Off, each call writes into fresh tensors.
    """

    precision: str = "fp32"
    threads: int = 0
    static_shapes: bool | Mapping[str, Sequence[int]] = True
    cache_dir: str | Path | None = None
    reuse_outputs: bool = False


@dataclass
class OpenVinoCall:
    """What one call holds: an infer request of the compiled model and, when outputs are reused, their buffers."""

    request: Any  # openvino.InferRequest
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def output(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = self.outputs.get(name)
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = self.outputs[name] = torch.empty(shape, dtype=dtype)
        return buffer


@dataclass(frozen=True)
class CompiledShapes:
    """A compiled model, the shapes it takes (None: any shape) and the calls made on it."""

    model: Any  # openvino.CompiledModel
    shapes: dict[str, tuple[int, ...]] | None
    calls: ContextPool[OpenVinoCall]

    def takes(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return self.shapes is None or self.shapes == shapes


class OpenVinoRunner(Runner):
    """Runs one exported component with OpenVINO's CPU plugin.

    Args:
        path: the component's ONNX file in an export directory.
        spec: the component's spec.
        files: the manifest's record of every file the component reads ({name: {"bytes", "sha256"}}):
            their hashes key the cache, the files besides the ONNX are its external weights.
        settings: see OpenVinoSettings.
    """

    backend = "openvino"

    def __init__(
        self,
        path: str | Path,
        spec: ComponentSpec,
        files: Mapping[str, Mapping[str, Any]],
        settings: OpenVinoSettings = OpenVinoSettings(),
    ):
        super().__init__(spec)
        check_settings(settings, spec)
        self.path, self.files, self.settings = Path(path), dict(files), settings
        self.folder: Path | None = None  # the cache folder of this export and these settings, set on activate
        self.model_path: Path | None = None  # the prepared model in that folder, set on activate
        self.ov = self.core = None  # the openvino module and its Core, set on activate
        # Compiled models, the static one (if any) first; replaced whole, so a call may read it unlocked.
        self.models: tuple[CompiledShapes, ...] = ()
        self._compile_lock = threading.Lock()  # concurrent first calls of a shape compile it once

    @property
    def compiled(self) -> Any:
        """The first compiled model (openvino.CompiledModel), None before it is made."""
        return self.models[0].model if self.models else None

    def activate_impl(self) -> None:
        self.ov = require("openvino")
        self.core = self.ov.Core()
        check_precision(self.core, self.settings.precision)
        self.folder = cache_folder(self.path, self.files, self.settings, self.ov.__version__)
        self.model_path = prepare_model(self.path, self.files, self.folder)
        if self.settings.static_shapes is not True:  # dynamic, or shapes given: compile now
            self.models = (self._compile(_fixed_shapes(self.settings.static_shapes)),)

    def deactivate_impl(self) -> None:
        for model in self.models:
            model.calls.clear()
        self.models, self.core = (), None

    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        inputs = {name: value.detach().cpu().contiguous() for name, value in feed.items()}
        shapes = {name: tuple(value.shape) for name, value in inputs.items()}
        model = self._model_taking(shapes) or self._compile_for(shapes)
        with model.calls.acquire() as call:
            return self._run(call, inputs, sizes)

    def _model_taking(self, shapes: dict[str, tuple[int, ...]]) -> CompiledShapes | None:
        return next((model for model in self.models if model.takes(shapes)), None)

    def _compile_for(self, shapes: dict[str, tuple[int, ...]]) -> CompiledShapes:
        """The model a call of new shapes runs on: static for the first call, dynamic for later ones."""
        if self.settings.static_shapes is not True:
            raise InvalidInputError(
                f"this OpenVINO runner of {self.spec.name} was compiled for static shapes {self.models[0].shapes}, "
                f"got {shapes}; feed those shapes, or open a runner with static_shapes=True (the first call's "
                "shapes static, others dynamic) or False (any shape)"
            )
        with self._compile_lock:
            model = self._model_taking(shapes)  # another thread may have compiled it meanwhile
            if model is None:
                if self.models:
                    log.info(
                        "%s called with shapes %s besides its static %s: compiling a dynamic model for them too",
                        self.spec.name, shapes, self.models[0].shapes,
                    )  # fmt: skip
                model = self._compile(None if self.models else shapes)
                self.models = (*self.models, model)
        return model

    def _compile(self, shapes: dict[str, tuple[int, ...]] | None) -> CompiledShapes:
        config = {
            "CACHE_DIR": str(self.folder / "compiled"),
            "INFERENCE_PRECISION_HINT": PRECISIONS[self.settings.precision][0],
        }
        if self.settings.threads:
            config["INFERENCE_NUM_THREADS"] = self.settings.threads
        if shapes is None:  # from the path: on a cache hit OpenVINO reads only the compiled blob
            compiled = self.core.compile_model(str(self.model_path), "CPU", config)
        else:
            model = self.core.read_model(str(self.model_path))
            try:
                model.reshape({name: list(shape) for name, shape in shapes.items()})
            except RuntimeError as err:
                raise InvalidInputError(
                    f"static_shapes {shapes} do not fit {self.spec.name}'s exported inputs ({err}); give each "
                    f"input a shape its spec allows: {[(t.name, t.shape) for t in self.spec.inputs]}"
                ) from err
            compiled = self.core.compile_model(model, "CPU", config)
        return CompiledShapes(compiled, shapes, ContextPool(lambda: OpenVinoCall(compiled.create_infer_request())))

    def _run(
        self, call: OpenVinoCall, inputs: dict[str, torch.Tensor], sizes: dict[str, int]
    ) -> dict[str, torch.Tensor]:
        ov = self.ov
        for name, value in inputs.items():
            call.request.set_tensor(name, ov.Tensor(value.numpy(), shared_memory=True))
        outputs = {}
        for t in self.spec.outputs:
            shape, dtype = self.spec.shape(t, sizes), getattr(torch, t.dtype)
            buffer = (
                call.output(t.name, shape, dtype) if self.settings.reuse_outputs else torch.empty(shape, dtype=dtype)
            )
            call.request.set_tensor(t.name, ov.Tensor(buffer.numpy(), shared_memory=True))
            outputs[t.name] = buffer
        call.request.infer()
        return outputs


def check_settings(settings: OpenVinoSettings, spec: ComponentSpec) -> None:
    """Refuse settings that cannot work, before anything is read or compiled."""
    if settings.precision not in PRECISIONS:
        raise InvalidInputError(
            f"unknown OpenVINO precision {settings.precision!r}; choose one of: {', '.join(PRECISIONS)}"
        )
    if not isinstance(settings.threads, int) or settings.threads < 0:
        raise InvalidInputError(
            f"OpenVINO threads must be a whole number >= 0 (0: OpenVINO chooses), got {settings.threads!r}"
        )
    shapes = settings.static_shapes
    if isinstance(shapes, bool):
        return
    expected = [t.name for t in spec.inputs]
    if not isinstance(shapes, Mapping) or sorted(shapes) != sorted(expected):
        given = sorted(shapes) if isinstance(shapes, Mapping) else type(shapes).__name__
        raise InvalidInputError(
            f"static_shapes must be True, False or a shape for every input of {spec.name} ({expected}), got {given}"
        )
    for t in spec.inputs:
        shape = tuple(shapes[t.name])
        if len(shape) != len(t.shape) or any(isinstance(d, int) and d != s for d, s in zip(t.shape, shape)):
            raise InvalidInputError(
                f"static_shapes gives {spec.name} input {t.name!r} the shape {shape}, expected one of the form "
                f"{t.shape} (named axes are free, numbers fixed)"
            )


def check_precision(core: Any, precision: str) -> None:
    """Refuse a precision the CPU has no units for (OpenVINO would silently run another one)."""
    capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    needed = PRECISIONS[precision][1]
    if needed not in capabilities:
        raise InvalidInputError(
            f"precision {precision!r} needs a CPU with {needed} support, and this CPU "
            f"({core.get_property('CPU', 'FULL_DEVICE_NAME')}) has only: {', '.join(capabilities)}; use precision='fp32'"
        )


def cache_folder(path: Path, files: Mapping[str, Mapping[str, Any]], settings: OpenVinoSettings, version: str) -> Path:
    """The folder of this export content, these compile settings and this OpenVINO: `<cache>/<component>-<key>`,
    its modification time renewed: it is the compiled models' last use, by which `vgrt cache prune` frees them.
    static_shapes is not in the key: OpenVINO names each blob by the model it compiles (its shapes included)
    and the config, so static and dynamic models share the folder and its prepared model without clashing."""
    identity = {
        "files": {name: record["sha256"] for name, record in sorted(files.items())},
        "precision": settings.precision,
        "threads": settings.threads,
        "openvino": version,
        "preparation": PREPARATION_VERSION,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(settings.cache_dir) if settings.cache_dir is not None else path.parent / CACHE_FOLDER
    folder = root / f"{path.stem}-{key}"
    try:
        (folder / "compiled").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArtifactError(
            f"cannot make the OpenVINO cache folder {str(folder)!r} ({err.strerror}); give a writable cache_dir"
        ) from err
    with contextlib.suppress(OSError):  # a read-only cache still serves the models it holds
        os.utime(folder)
    return folder


def prepare_model(path: Path, files: Mapping[str, Mapping[str, Any]], folder: Path) -> Path:
    """The model OpenVINO reads, in `folder`: made on the first open, reused after (it is written whole
    under a temporary name, then renamed). External weights are linked beside it."""
    prepared = folder / path.name
    for name in files:
        if name != path.name:
            _link(path.parent / name, folder / name)
    if prepared.exists():
        return prepared
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)  # weights stay where they are
    changed = bool(model.functions)
    if changed:
        model = require("onnx.inliner").inline_local_functions(model)
    changed |= guard_masked_rows(model.graph) > 0
    if changed:
        temporary = folder / f".{path.name}.{secrets.token_hex(4)}"
        onnx.save(model, str(temporary))
        os.replace(temporary, prepared)
    else:
        _link(path, prepared)
    return prepared


def guard_masked_rows(graph: Any) -> int:
    """Rewrite each "every value is -inf" test `IsInf(ReduceMax(x), detect_positive=0)` into
    `ReduceMin(Cast(IsInf(x, detect_positive=0))) == 1`, which reads no reduction of -inf (OpenVINO's
    CPU ReduceMax of an all -inf row is the lowest finite float). Where x is attention scores
    `Add(MatMul(q, k), bias)`, the test reads the bias: the same rows are masked, and the bias is smaller
    (it broadcasts over heads). Returns how many tests were rewritten."""
    from onnx import TensorProto, helper

    made_by = {output: node for node in graph.node for output in node.output}
    nodes, rewritten = [], 0
    for node in graph.node:
        source = made_by.get(node.input[0]) if node.op_type == "IsInf" else None
        detects = {a.name: a.i for a in node.attribute}
        if source is None or source.op_type != "ReduceMax" or detects.get("detect_positive", 1) != 0:
            nodes.append(node)
            continue
        name, out, values = node.name or node.output[0], node.output[0], _mask_of(source, made_by)
        nodes += [
            helper.make_node("IsInf", [values], [f"{out}_each"], f"{name}_each", detect_positive=0),
            helper.make_node("Cast", [f"{out}_each"], [f"{out}_each_f"], f"{name}_each_f", to=TensorProto.FLOAT),
            helper.make_node("ReduceMin", [f"{out}_each_f", *source.input[1:]], [f"{out}_all"], f"{name}_all"),
            helper.make_node("Cast", [f"{out}_all"], [out], f"{name}_cast", to=TensorProto.BOOL),
        ]
        nodes[-2].attribute.extend(source.attribute)  # the ReduceMax's keepdims (and noop_with_empty_axes)
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _mask_of(reduce_max: Any, made_by: dict[str, Any]) -> str:
    """What a ReduceMax's all -inf test can read: the bias of scores `Add(MatMul, bias)` (kept dims only:
    its rows broadcast to the scores' rows), else the ReduceMax's own input."""
    scores = reduce_max.input[0]
    add = made_by.get(scores)
    keeps_dims = {a.name: a.i for a in reduce_max.attribute}.get("keepdims", 1) == 1
    if add is None or add.op_type != "Add" or not keeps_dims:
        return scores
    for product, bias in (add.input, add.input[::-1]):
        if getattr(made_by.get(product), "op_type", None) == "MatMul":
            return bias
    return scores


def _fixed_shapes(shapes: bool | Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]] | None:
    """The shapes a runner compiles for up front; None for dynamic shapes or the first call's shapes."""
    if isinstance(shapes, bool):
        return None
    return {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}


def _link(target: Path, link: Path) -> None:
    """`link` as a hard link to `target` (a copy across file systems), made atomically. Not a symbolic
    link: OpenVINO resolves those and refuses external weights outside the model's folder."""
    if link.exists():
        return
    temporary = link.with_name(f".{link.name}.{secrets.token_hex(4)}")
    try:
        os.link(target, temporary)
    except OSError:
        log.warning("cannot hard-link %s into %s (another file system?): copying it", target, link.parent)
        shutil.copyfile(target, temporary)
    os.replace(temporary, link)
