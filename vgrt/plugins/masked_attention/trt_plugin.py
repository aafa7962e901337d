"""TensorRT plugin of `vgrt::MaskedAttention`, defined with `tensorrt.plugin` (quickly deployable plugins).

`MASKED_ATTENTION` declares the plugin once (name, namespace, version, tensors, attributes): the graph
pass that writes plugin nodes (`vgrt.export.plugin_form`) and `register_plugin` both read it.
`register_plugin()` registers, on first call and never at import:
- the shape/type description (@trtp.register): out = [B, H, Lq, Dv] in q's dtype;
- the type/format combinations TensorRT may choose (@trtp.autotune): fp16, bf16 or fp32 throughout, linear;
- a JIT implementation (@trtp.impl): the Triton kernel launched through torch on TensorRT's stream;
- an ahead-of-time implementation (@trtp.aot_impl): the same kernel compiled to PTX, with launch
  parameters as symbolic shape expressions, so an engine built from `aot=1` nodes runs without Python.

Both implementations launch one kernel, `masked_attention_plugin`, with one argument list in the order
TensorRT's AOT launcher passes arguments: input pointers (q, k, v, bias), int32 scalars, output pointer.
It wraps the flash-attention kernel of `triton_kernel` for the dense row-major tensors TensorRT hands a
plugin; q arrives pre-scaled (the node contract), so the plugin has no attributes.

Masked key tiles are skipped in an engine too: the kernel derives each (query tile, key tile) flag from
the bias tile before it loads keys (`TILES_FROM_BIAS`), on the GPU, in the same launch. A separate tile
mask would need a second kernel, or a workspace or an extra plugin input, none of which an AOT
implementation (one PTX kernel, inputs, scalars, outputs) or the exported graph has.

No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions' annotations
as classes.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from vgrt._lazy import require
from vgrt.errors import InvalidInputError, VgrtError
from vgrt.plugins.masked_attention.identity import NODE_DOMAIN, NODE_TYPE, NODE_VERSION


@dataclass(frozen=True)
class PluginDescription:
    """Identity of a TensorRT plugin and of the ONNX node that TensorRT's parser maps onto it."""

    namespace: str
    name: str
    version: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: tuple[str, ...] = ()  # plugin fields, in registration order

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.name}"

    def node_attributes(self, aot: bool) -> dict[str, str | int]:
        """The ONNX attributes that select this plugin: the parser's fallback importer takes the plugin
        name from op_type and these two attributes, and `aot` picks the ahead-of-time implementation."""
        return {"plugin_namespace": self.namespace, "plugin_version": self.version, "aot": int(aot)}


MASKED_ATTENTION = PluginDescription(
    namespace=NODE_DOMAIN,
    name=NODE_TYPE,
    version=str(NODE_VERSION),
    inputs=("q", "k", "v", "bias"),
    outputs=("out",),
)
# tensorrt.plugin registers every plugin as version "1"; a node asking for another is never found.
QDP_VERSION = "1"

DTYPES = ("fp16", "bf16", "fp32")
SCALARS = ("num_heads", "len_q", "len_k", "bias_batch", "bias_heads", "bias_rows")
# Dynamic shared memory above 48 KiB needs a per-kernel opt-in that the AOT launch parameters cannot
# express, so every AOT kernel must fit under it.
SHARED_MEMORY_LIMIT = 48 * 1024


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time choices of the plugin kernel for one dtype and head size.

    Tiles as in `triton_kernel` (D padded to a power of two, at least 16), with query tiles small enough
    for the shared memory limit: fp32 dots keep fp32 operands in shared memory, and head size 160
    (SD 1.5) pads to 256.
    """

    dtype: str
    head_dim: int

    def __post_init__(self) -> None:
        from vgrt.plugins.masked_attention.triton_kernel import MAX_HEAD_SIZE

        if self.dtype not in DTYPES or not 1 <= self.head_dim <= MAX_HEAD_SIZE:
            raise InvalidInputError(
                f"the MaskedAttention plugin takes {', '.join(DTYPES)} with head size 1..{MAX_HEAD_SIZE}; "
                f"got {self.dtype} with head size {self.head_dim}"
            )

    @property
    def block_d(self) -> int:
        return max(16, 1 << (self.head_dim - 1).bit_length())

    @property
    def block_m(self) -> int:
        if self.dtype == "fp32":
            return 16
        return 64 if self.block_d <= 128 else 32

    @property
    def block_n(self) -> int:
        from vgrt.plugins.masked_attention.triton_kernel import BLOCK_N

        return BLOCK_N

    @property
    def num_warps(self) -> int:
        return 4 if self.block_d <= 64 else 8

    def constexprs(self) -> dict[str, object]:
        tl = require("triton.language")
        return {
            "HEAD_DIM": self.head_dim,
            "BLOCK_D": self.block_d,
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "DOT_DTYPE": {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[self.dtype],
            # fp32 dots as in the PyTorch reference (no TF32).
            "DOT_PRECISION": "ieee" if self.dtype == "fp32" else "tf32",
        }


def kernel_scalars(q_shape, k_shape, bias_shape) -> tuple:
    """The int32 scalar arguments, in kernel order, from the shapes of q, k and bias.

    Works on ints (JIT launch) and on TensorRT's symbolic shape expressions (AOT launch) alike.
    """
    return (q_shape[1], q_shape[2], k_shape[2], bias_shape[0], bias_shape[1], bias_shape[2])


def launch_grid(q_shape, block_m: int, cdiv: Callable) -> tuple:
    """(x, y, z) program grid: one program per query tile per (batch, head); ints or shape expressions."""
    return (cdiv(q_shape[2], block_m), q_shape[0] * q_shape[1], 1)


def _int_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The flash-attention kernel the plugin kernel calls. Triton resolves a called kernel among the module's
# globals (its interpreter drops closures), so plugin_kernel() binds it here.
_attention = None


@cache
def plugin_kernel():
    """The @triton.jit plugin kernel, defined on first use so that triton is imported only then."""
    global _attention
    triton = require("triton")
    tl = require("triton.language")
    from vgrt.plugins.masked_attention.triton_kernel import _kernel

    _attention = _kernel()
    if hasattr(_attention, "rewrite"):
        # Triton's CPU interpreter (TRITON_INTERPRET=1) finds triton.language through a called kernel's
        # module globals, which only its first rewrite fills in.
        _attention.rewrite()

    @triton.jit
    def masked_attention_plugin(
        q, k, v, bias,
        num_heads, len_q, len_k, bias_batch, bias_heads, bias_rows,
        out,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # q, k, v, out are dense [B, H, L, D]; the bias is dense [B or 1, H or 1, Lq or 1, Lk], and an
        # axis of extent 1 broadcasts by stride 0 (decided here, so shapes may change at run time).
        # Offsets are int32, as TensorRT's AOT scalars are: each tensor holds fewer than 2**31 elements.
        q_head = len_q * HEAD_DIM
        kv_head = len_k * HEAD_DIM
        bias_row = len_k * tl.minimum(bias_rows - 1, 1)
        bias_head = bias_rows * len_k * tl.minimum(bias_heads - 1, 1)
        bias_batch_stride = bias_heads * bias_rows * len_k * tl.minimum(bias_batch - 1, 1)
        _attention(
            q, k, v, bias, q, out,  # q stands in for the tile mask tensor, never read: tiles come from the bias
            num_heads * q_head, q_head, HEAD_DIM, 1,
            num_heads * kv_head, kv_head, HEAD_DIM, 1,
            num_heads * kv_head, kv_head, HEAD_DIM, 1,
            bias_batch_stride, bias_head, bias_row, 1,
            0, 0, 0, 0,
            num_heads * q_head, q_head, HEAD_DIM, 1,
            num_heads, len_q, len_k, 1.0,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BIAS_KIND=1,
            HAS_TILE_MASK=False, TILES_FROM_BIAS=True, DOT_DTYPE=DOT_DTYPE, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip

    return masked_attention_plugin


def _dtype_name(torch_dtype) -> str:
    torch = require("torch")
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    if torch_dtype not in names:
        raise InvalidInputError(f"the MaskedAttention plugin takes fp16, bf16 or fp32 tensors; got {torch_dtype}")
    return names[torch_dtype]


def launch_plugin_kernel(q, k, v, bias, out) -> None:
    """Launch the plugin kernel on torch tensors (the current stream), as the JIT implementation does."""
    tensors = {"q": q, "k": k, "v": v, "bias": bias, "out": out}
    if any(t.dim() != 4 or not t.is_contiguous() or t.dtype != q.dtype for t in tensors.values()):
        raise InvalidInputError(
            "the MaskedAttention plugin takes dense 4-D tensors of one dtype; got "
            + ", ".join(f"{n} {t.dtype} {tuple(t.shape)}" for n, t in tensors.items())
        )
    config = KernelConfig(_dtype_name(q.dtype), q.shape[3])
    grid = launch_grid(q.shape, config.block_m, _int_cdiv)[:2]
    plugin_kernel()[grid](
        q, k, v, bias, *kernel_scalars(q.shape, k.shape, bias.shape), out,
        **config.constexprs(), num_warps=config.num_warps,
    )  # fmt: skip


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared_memory: int  # bytes of dynamic shared memory per program


def compile_plugin_kernel(config: KernelConfig, target=None) -> CompiledKernel:
    """PTX of the plugin kernel for `config`, its parameters trimmed to TensorRT's AOT launch contract.

    `target` is a triton GPUTarget; None compiles for the current GPU (what an engine build wants).
    """
    triton = require("triton")
    pointer = f"*{config.dtype}"
    signature = {
        **{name: pointer for name in MASKED_ATTENTION.inputs},
        **{name: "i32" for name in SCALARS},
        **{name: pointer for name in MASKED_ATTENTION.outputs},
        **{name: "constexpr" for name in config.constexprs()},
    }
    source = triton.compiler.ASTSource(fn=plugin_kernel(), signature=signature, constexprs=config.constexprs())
    compiled = triton.compile(source, target=target, options={"num_warps": config.num_warps})
    metadata = compiled.metadata
    if metadata.shared > SHARED_MEMORY_LIMIT:
        raise VgrtError(
            f"the MaskedAttention AOT kernel for {config.dtype} head size {config.head_dim} needs "
            f"{metadata.shared} bytes of shared memory, over the {SHARED_MEMORY_LIMIT} an AOT launch gets; "
            "export the model with --precision fp16 or build with the JIT plugin"
        )
    launch_arguments = len(MASKED_ATTENTION.inputs) + len(SCALARS) + len(MASKED_ATTENTION.outputs)
    ptx = trim_entry_parameters(compiled.asm["ptx"], metadata.name, launch_arguments)
    return CompiledKernel(metadata.name, ptx, metadata.num_warps, metadata.shared)


def trim_entry_parameters(ptx: str, entry: str, keep: int) -> str:
    """Drop the entry's parameters after the first `keep`, which the kernel body must not read.

    Triton >= 3.3 appends scratch-buffer pointers to every kernel; TensorRT's AOT launcher passes only
    inputs, scalars and outputs, so a kernel that declares more parameters would read past its arguments.
    """
    start = ptx.index("(", ptx.index(f".entry {entry}(")) + 1
    end = ptx.index(")", start)
    parameters = [p.strip() for p in ptx[start:end].split(",")]
    if len(parameters) < keep:
        raise VgrtError(
            f"kernel {entry} declares {len(parameters)} parameters, fewer than the {keep} it is launched with"
        )
    body = ptx[end:]
    read = [p.split()[-1] for p in parameters[keep:] if f"[{p.split()[-1]}]" in body]
    if read:
        raise VgrtError(f"kernel {entry} reads {read}, which TensorRT's AOT launch does not pass (scratch memory)")
    return ptx[:start] + "\n\t" + ",\n\t".join(parameters[:keep]) + "\n" + ptx[end:]


@cache
def register_plugin() -> str:
    """Register `vgrt::MaskedAttention` with TensorRT's plugin registry (once per process); return its id.

    Call it before parsing an ONNX file with plugin nodes, and before deserializing an engine built with
    the JIT implementation (an AOT engine needs no registration).
    """
    from vgrt.engines.tensorrt.library import require_tensorrt

    trt = require_tensorrt()
    trtp = require("tensorrt.plugin")
    if MASKED_ATTENTION.version != QDP_VERSION:
        raise VgrtError(
            f"{MASKED_ATTENTION.plugin_id} has node version {MASKED_ATTENTION.version}, but tensorrt.plugin "
            f"registers plugins as version {QDP_VERSION} only"
        )
    names = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}

    def config_of(q) -> KernelConfig:
        head_dim = q.shape_expr[3]
        if not head_dim.is_constant:
            raise VgrtError(f"{MASKED_ATTENTION.plugin_id} needs a static head size to compile its kernel")
        return KernelConfig(names[q.dtype], head_dim.constant_value())

    @trtp.register(MASKED_ATTENTION.plugin_id)
    def masked_attention_shape(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, bias: trtp.TensorDesc
    ) -> trtp.TensorDesc:
        if any(t.ndim != 4 for t in (q, k, v, bias)):
            raise ValueError(f"{MASKED_ATTENTION.plugin_id} takes 4-D q, k, v and bias")
        shape = q.shape_expr
        return trtp.from_shape_expr((shape[0], shape[1], shape[2], v.shape_expr[3]), dtype=q.dtype)

    @trtp.autotune(MASKED_ATTENTION.plugin_id)
    def masked_attention_formats(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, bias: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:  # fmt: skip
        # One dtype for every input and the output; under strong typing the graph picks which.
        one_dtype = ", ".join(["FP16|BF16|FP32"] * (len(MASKED_ATTENTION.inputs) + len(MASKED_ATTENTION.outputs)))
        return [trtp.AutoTuneCombination(one_dtype, "LINEAR")]

    @trtp.impl(MASKED_ATTENTION.plugin_id)
    def masked_attention_jit(
        q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, bias: trtp.Tensor, outputs: tuple[trtp.Tensor], stream: int
    ) -> None:
        torch = require("torch")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tensors = [torch.as_tensor(t, device="cuda") for t in (q, k, v, bias, outputs[0])]
            launch_plugin_kernel(*tensors)

    @trtp.aot_impl(MASKED_ATTENTION.plugin_id)
    def masked_attention_aot(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, bias: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:  # fmt: skip
        config = config_of(q)
        kernel = compile_plugin_kernel(config)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = launch_grid(q.shape_expr, config.block_m, trtp.cdiv)
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_memory
        scalars = kernel_scalars(q.shape_expr, k.shape_expr, bias.shape_expr)
        return kernel.name, kernel.ptx, launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in scalars])

    return MASKED_ATTENTION.plugin_id
