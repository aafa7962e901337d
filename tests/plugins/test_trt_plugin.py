"""The TensorRT plugin of MaskedAttention, without TensorRT: its declared identity, its registration
(against a stand-in of the documented `tensorrt.plugin` API), its kernel (on the GPU where there is one,
else under Triton's CPU interpreter), and its AOT PTX (compiled for sm_90 and assembled by ptxas, no GPU
needed).

Kernels run in child processes: Triton fixes interpreted or compiled mode when it is first imported,
and this process may have imported it either way before these tests run.
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

pytest.importorskip("triton")

from vgrt.errors import InvalidInputError, MissingDependencyError, VgrtError
from vgrt.plugins.masked_attention import NODE_DOMAIN, NODE_TYPE, NODE_VERSION, trt_plugin
from vgrt.plugins.masked_attention.trt_plugin import (
    MASKED_ATTENTION,
    CompiledKernel,
    KernelConfig,
    kernel_scalars,
    launch_grid,
    launch_plugin_kernel,
    trim_entry_parameters,
)


def test_description_is_the_node_identity():
    assert (MASKED_ATTENTION.namespace, MASKED_ATTENTION.name) == (NODE_DOMAIN, NODE_TYPE)
    assert MASKED_ATTENTION.version == str(NODE_VERSION) == trt_plugin.QDP_VERSION
    assert MASKED_ATTENTION.plugin_id == "vgrt::MaskedAttention"
    assert MASKED_ATTENTION.inputs == ("q", "k", "v", "bias") and MASKED_ATTENTION.attributes == ()
    assert MASKED_ATTENTION.node_attributes(aot=True) == {"plugin_namespace": "vgrt", "plugin_version": "1", "aot": 1}
    assert MASKED_ATTENTION.node_attributes(aot=False)["aot"] == 0


def test_importing_the_plugin_module_loads_neither_tensorrt_nor_triton():
    code = (
        "import sys, vgrt.plugins.masked_attention.trt_plugin, vgrt.export.plugin_form; "
        "print([m for m in ('tensorrt', 'triton', 'polygraphy') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_registration_without_tensorrt_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt now raises ImportError
    trt_plugin.register_plugin.cache_clear()
    with pytest.raises(MissingDependencyError, match=r"pip install 'vgrt\[trt\]'"):
        trt_plugin.register_plugin()
    trt_plugin.register_plugin.cache_clear()


# --- registration, against a stand-in of tensorrt.plugin -------------------------------------------


class Dim(int):
    """A build-time constant shape expression."""

    is_constant = True

    def constant_value(self) -> int:
        return int(self)


class Desc:
    def __init__(self, shape, dtype):
        self.shape_expr, self.dtype, self.ndim = tuple(map(Dim, shape)), dtype, len(shape)


def _fake_tensorrt():
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.registered = {}

    def decorator(kind):
        def with_id(plugin_id):
            def record(fn):
                trtp.registered[kind] = (plugin_id, fn)
                return fn

            return record

        return with_id

    trtp.register, trtp.impl, trtp.autotune, trtp.aot_impl = map(
        decorator, ("register", "impl", "autotune", "aot_impl")
    )
    trtp.TensorDesc, trtp.Tensor = type("TensorDesc", (), {}), type("Tensor", (), {})
    trtp.AutoTuneCombination = type(
        "AutoTuneCombination", (), {"__init__": lambda self, *spec: setattr(self, "spec", spec)}
    )
    trtp.KernelLaunchParams = type("KernelLaunchParams", (), {})
    trtp.SymInt32 = type("SymInt32", (), {"__init__": lambda self, e: setattr(self, "expr", e)})
    trtp.SymIntExprs = type("SymIntExprs", (), {"from_tuple": staticmethod(list)})
    trtp.cdiv = lambda a, b: -(-a // b)
    trtp.from_shape_expr = lambda shape, dtype: ("desc", tuple(shape), dtype)
    trt = types.ModuleType("tensorrt")
    trt.float16, trt.bfloat16, trt.float32, trt.plugin = "HALF", "BF16", "FLOAT", trtp
    return trt, trtp


@pytest.fixture
def registered(monkeypatch):
    trt, trtp = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    trt_plugin.register_plugin.cache_clear()
    assert trt_plugin.register_plugin() == MASKED_ATTENTION.plugin_id
    yield trtp
    trt_plugin.register_plugin.cache_clear()


def test_registers_the_four_definitions_under_the_declared_id(registered):
    assert {kind: plugin_id for kind, (plugin_id, _) in registered.registered.items()} == {
        kind: MASKED_ATTENTION.plugin_id for kind in ("register", "impl", "autotune", "aot_impl")
    }


def test_signatures_follow_tensorrt_plugin_rules(registered):
    """tensorrt.plugin reads these signatures: tensors by TensorDesc annotation (classes, not strings),
    then attributes, and fixed trailing names for the implementations."""
    tensors, attributes = list(MASKED_ATTENTION.inputs), list(MASKED_ATTENTION.attributes)
    shape = inspect.signature(registered.registered["register"][1])
    assert list(shape.parameters) == tensors + attributes
    assert all(p.annotation is registered.TensorDesc for p in shape.parameters.values())
    assert shape.return_annotation is registered.TensorDesc
    expected = {"impl": ["outputs", "stream"], "aot_impl": ["outputs", "tactic"], "autotune": ["outputs"]}
    for kind, trailing in expected.items():
        assert list(inspect.signature(registered.registered[kind][1]).parameters) == tensors + attributes + trailing


def test_shape_function_gives_q_shape_with_v_head_size_in_q_dtype(registered):
    shape_of = registered.registered["register"][1]
    q, k, v = Desc((2, 8, 4096, 40), "HALF"), Desc((2, 8, 77, 40), "HALF"), Desc((2, 8, 77, 40), "HALF")
    assert shape_of(q, k, v, Desc((2, 1, 1, 77), "HALF")) == ("desc", (2, 8, 4096, 40), "HALF")
    with pytest.raises(ValueError, match="4-D"):
        shape_of(q, k, v, Desc((2, 77), "HALF"))


def test_autotune_offers_one_dtype_for_all_inputs_and_the_output(registered):
    (combination,) = registered.registered["autotune"][1](*[None] * 4, outputs=(None,))
    dtypes, layout = combination.spec
    assert dtypes.split(", ") == ["FP16|BF16|FP32"] * 5 and layout == "LINEAR"


def test_aot_launch_is_the_launch_the_jit_path_makes(registered, monkeypatch):
    compiled = []

    def fake_compile(config, target=None):
        compiled.append(config)
        return CompiledKernel("masked_attention_plugin", "ptx", num_warps=8, shared_memory=34816)

    monkeypatch.setattr(trt_plugin, "compile_plugin_kernel", fake_compile)
    q, k, v, bias = (
        Desc((2, 8, 100, 160), "HALF"),
        Desc((2, 8, 77, 160), "HALF"),
        Desc((2, 8, 77, 160), "HALF"),
        Desc((2, 1, 100, 77), "HALF"),
    )
    name, ptx, launch, scalars = registered.registered["aot_impl"][1](q, k, v, bias, (None,), 0)
    config = KernelConfig("fp16", 160)
    assert compiled == [config] and (name, ptx) == ("masked_attention_plugin", "ptx")
    assert (launch.grid_x, launch.grid_y, launch.grid_z) == (-(-100 // config.block_m), 16, 1)
    assert (launch.block_x, launch.shared_mem) == (8 * 32, 34816)
    assert [s.expr for s in scalars] == [8, 100, 77, 2, 1, 100]
    assert tuple(s.expr for s in scalars) == kernel_scalars(q.shape_expr, k.shape_expr, bias.shape_expr)


# --- the kernel, under Triton's CPU interpreter ----------------------------------------------------


def _run_child(script: str, interpret: bool) -> dict:
    """Run `script` in a fresh Python with or without Triton's interpreter; return the JSON it prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], check=False, capture_output=True, text=True, env=env
    )
    if result.returncode != 0 and "No module named 'triton.backends.nvidia" in result.stderr:
        pytest.skip("this triton has no NVIDIA backend")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


B, H, LQ, LK = 2, 3, 70, 45  # LQ spans two query tiles, the second partial; LK two key tiles
BIAS_SHAPES = [(B, 1, 1, LK), (B, 1, LQ, LK), (1, 1, 1, LK), (B, H, LQ, LK), (1, H, 1, LK)]
DTYPES = ["float32", "float16"]

ON_GPU = torch.cuda.is_available()  # else kernels run under the interpreter

INTERPRETED_SCRIPT = f"""
    import json
    import torch
    from vgrt.plugins.masked_attention import masked_attention
    from vgrt.plugins.masked_attention.trt_plugin import launch_plugin_kernel

    B, H, LQ, LK = {B}, {H}, {LQ}, {LK}
    torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
    report = {{}}
    for dtype_name in {DTYPES!r}:
        dtype = getattr(torch, dtype_name)
        for bias_shape in {BIAS_SHAPES!r}:
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, length, 40).to(dtype) for length in (LQ, LK, LK))
            bias = torch.randn(bias_shape).masked_fill(torch.rand(bias_shape) < 0.3, float("-inf"))
            if bias_shape[2] == LQ:
                bias[..., 0, :] = float("-inf")  # a query row with no allowed key: zeros, not NaN
            elif bias_shape[0] == B:
                bias[1] = float("-inf")  # a batch row with no allowed key at all
            bias = bias.to(dtype)
            out = torch.empty_like(q)
            launch_plugin_kernel(q, k, v, bias, out)
            expected = masked_attention(q.float(), k.float(), v.float(), bias.float(), scale=1.0)
            tolerance = 1e-4 if dtype == torch.float32 else 2e-3
            try:
                torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)  # NaN fails too
                report[f"{{dtype_name}}-{{bias_shape}}"] = None
            except AssertionError as err:
                report[f"{{dtype_name}}-{{bias_shape}}"] = str(err)
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def interpreted():
    return _run_child(INTERPRETED_SCRIPT, interpret=not ON_GPU)


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_the_reference_for_every_bias_broadcast(interpreted, dtype, bias_shape):
    assert interpreted[f"{dtype}-{bias_shape}"] is None


SKIP_SCRIPT = """
    import json
    import torch
    from vgrt.plugins.masked_attention import masked_attention
    from vgrt.plugins.masked_attention.trt_plugin import KernelConfig, launch_plugin_kernel

    torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
    B, H, LQ, LK, BLOCK_N = 2, 2, 70, 96, KernelConfig("fp16", 40).block_n  # 3 key tiles
    report = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, length, 40).to(dtype) for length in (LQ, LK, LK))
        # A key mask [B, 1, 1, Lk] (text key masks, mutual attention) and a per-query one [B, 1, Lq, Lk]
        # (region masks): batch 0 masks key tile 1 for every query, batch 1 key tiles 0 and 2.
        masked_tiles = torch.tensor([[False, True, False], [True, False, True]])
        masked_keys = masked_tiles.repeat_interleave(BLOCK_N, 1)[:, None, None, :]  # [B, 1, 1, Lk]
        for form, shape in (("key", (B, 1, 1, LK)), ("query", (B, 1, LQ, LK))):
            bias = torch.randn(shape).masked_fill(masked_keys.expand(shape), float("-inf")).to(dtype)
            expected = masked_attention(q.float(), k.float(), v.float(), bias.float(), scale=1.0)
            # NaN keys and values in the masked tiles: a kernel that read them would return NaN.
            poison = masked_keys[:, :, 0, :, None]  # [B, 1, Lk, 1]
            k_poisoned, v_poisoned = (t.masked_fill(poison, float("nan")) for t in (k, v))
            out = torch.empty_like(q)
            launch_plugin_kernel(q, k_poisoned, v_poisoned, bias, out)
            tolerance = 1e-4 if dtype == torch.float32 else 2e-3
            try:
                torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
                report[f"{dtype}-{form}"] = None
            except AssertionError as err:
                report[f"{dtype}-{form}"] = str(err)
            # One allowed key in a masked tile makes it a visited tile: its NaN keys now reach the output.
            opened = bias.clone()
            opened[0, ..., BLOCK_N] = 0.0
            launch_plugin_kernel(q, k_poisoned, v_poisoned, opened, out)
            report[f"{dtype}-{form}-opened-nan"] = bool(out[0].isnan().any())
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def skipped_tiles():
    return _run_child(SKIP_SCRIPT, interpret=not ON_GPU)


@pytest.mark.parametrize("form", ["key", "query"])
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.float16"])
def test_plugin_kernel_never_reads_key_tiles_its_bias_masks(skipped_tiles, dtype, form):
    """The tiles the bias masks fully are flagged and skipped (their NaN keys never show), the output
    is the reference's, and a tile with one allowed key is visited."""
    assert skipped_tiles[f"{dtype}-{form}"] is None
    assert skipped_tiles[f"{dtype}-{form}-opened-nan"] is True


def test_kernel_refuses_what_tensorrt_never_hands_it():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(InvalidInputError, match="dense 4-D tensors of one dtype"):
        launch_plugin_kernel(q, q, q, torch.zeros(1, 1, 1, 8, dtype=torch.float16), torch.empty_like(q))
    with pytest.raises(InvalidInputError, match="head size"):
        KernelConfig("fp16", 512)


def test_grid_covers_every_query_tile():
    config = KernelConfig("fp16", 40)
    for len_q in (1, config.block_m, config.block_m + 1, 4096):
        tiles, programs, one = launch_grid((2, 8, len_q, 40), config.block_m, lambda a, b: -(-a // b))
        assert (tiles - 1) * config.block_m < len_q <= tiles * config.block_m and (programs, one) == (16, 1)


# --- AOT PTX ---------------------------------------------------------------------------------------


def test_trim_keeps_the_launch_contract_and_refuses_to_drop_a_read_parameter():
    ptx = ".entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n\tld.param.u64 %rd1, [k_param_0];\n}"
    trimmed = trim_entry_parameters(ptx, "k", 1)
    assert "k_param_1" not in trimmed and "[k_param_0]" in trimmed
    with pytest.raises(VgrtError, match="k_param_0"):
        trim_entry_parameters(ptx, "k", 0)


AOT_SCRIPT = """
    import json, re, subprocess, sys, tempfile
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from vgrt.errors import VgrtError
    from vgrt.plugins.masked_attention.trt_plugin import KernelConfig, compile_plugin_kernel

    target, report = GPUTarget("cuda", 90, 32), {}
    for dtype, head_dim in [("fp16", 16), ("fp16", 40), ("fp16", 160), ("bf16", 64), ("fp32", 64), ("fp32", 160)]:
        try:
            kernel = compile_plugin_kernel(KernelConfig(dtype, head_dim), target)
        except VgrtError as err:
            report[f"{dtype}-{head_dim}"] = {"error": str(err)}
            continue
        header = kernel.ptx[kernel.ptx.index(f".entry {kernel.name}("):]
        header = header[: header.index(")")]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(kernel.ptx)
            f.flush()
            assembled = subprocess.run([get_ptxas(90).path, "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
                                       capture_output=True, text=True)
        report[f"{dtype}-{head_dim}"] = {
            "params": re.findall(r"\\.param \\.(\\w+)", header), "warps": kernel.num_warps,
            "shared": kernel.shared_memory, "ptxas": assembled.returncode, "ptxas_err": assembled.stderr[-300:],
        }
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def aot_kernels():
    return _run_child(AOT_SCRIPT, interpret=False)  # the interpreter cannot emit PTX


@pytest.mark.parametrize("variant", ["fp16-16", "fp16-40", "fp16-160", "bf16-64", "fp32-64"])
def test_aot_ptx_takes_exactly_the_arguments_tensorrt_passes(aot_kernels, variant):
    kernel = aot_kernels[variant]
    assert kernel["params"] == ["u64"] * 4 + ["u32"] * 6 + ["u64"]  # q k v bias, 6 scalars, out
    assert kernel["shared"] <= trt_plugin.SHARED_MEMORY_LIMIT
    assert kernel["ptxas"] == 0, kernel["ptxas_err"]


def test_aot_refuses_a_kernel_over_the_shared_memory_an_aot_launch_gets(aot_kernels):
    assert (
        "shared memory" in aot_kernels["fp32-160"]["error"] and "--precision fp16" in aot_kernels["fp32-160"]["error"]
    )
