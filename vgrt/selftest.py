"""`vgrt selftest`: the first contact with a machine, in one command, offline.

GPU mode (`--gpu`, a machine with an NVIDIA GPU, PyTorch and Triton):
- the Triton kernel against the PyTorch reference, and its time against PyTorch SDPA, at SD 1.5 and
  SDXL self-attention sizes, dense and with half the key tiles masked (fp16); the plugin's kernel (tile
  flags from the bias, as in a TensorRT engine) on the masked cases too;
- every method of the registry on `--backend torch --device cuda` against its CPU result;
- TensorRT and ONNX Runtime CUDA on a tiny UNet against ONNX Runtime on the CPU, where installed
  (skipped with the reason where not).
CPU mode (no flag; what CI runs): the kernel under Triton's interpreter against the reference at small
sizes, and every method on the tiny preset on torch against onnxruntime.

Each check is a `Check` (ok, failed or skipped, with its numbers); the report is written as JSON into
bench/results. Timing targets (issue 14): masked <= 0.5x the dense kernel, dense kernel <= SDPA.
"""

import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from vgrt.errors import VgrtError

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
MASKED_TO_DENSE_TARGET = 0.5  # masked kernel time / dense kernel time, half the key tiles masked
DENSE_TO_SDPA_TARGET = 1.0  # dense kernel time / SDPA time


@dataclass(frozen=True)
class AttentionSize:
    """One self-attention layer: batch (CFG doubles it), heads, tokens, head size."""

    model: str
    batch: int
    heads: int
    tokens: int
    head_size: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.batch}x{self.heads}x{self.tokens}x{self.head_size}"


# The self-attention layers of SD 1.5 (8 heads; 512 px: 64x64, 32x32, 16x16 latents) and SDXL (head
# size 64; 1024 px: 64x64 and 32x32 latents at 10 and 20 heads), with CFG's batch of 2.
GPU_SIZES = (
    AttentionSize("sd15", 2, 8, 4096, 40),
    AttentionSize("sd15", 2, 8, 1024, 80),
    AttentionSize("sd15", 2, 8, 256, 160),
    AttentionSize("sdxl", 2, 10, 4096, 64),
    AttentionSize("sdxl", 2, 20, 1024, 64),
)
# Under the interpreter (slow: one size): two query tiles, the second partial, three key tiles, the middle
# one masked, and a head size the kernel pads.
CPU_SIZES = (AttentionSize("small", 1, 2, 96, 40),)


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    mode: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAILED]

    def to_json(self) -> dict[str, Any]:
        from vgrt.bench.machine import library_versions, machine_info

        return {
            "suite": "selftest",
            "mode": self.mode,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "versions": library_versions(),
            "targets": {"masked_to_dense": MASKED_TO_DENSE_TARGET, "dense_to_sdpa": DENSE_TO_SDPA_TARGET},
            "checks": [asdict(c) for c in self.checks],
        }


def run_selftest(
    gpu: bool,
    methods: tuple[str, ...] | None = None,
    preset: str = "tiny",
    report: Callable[[Check], None] = lambda check: None,
) -> Report:
    """Run every check of the mode; `report` sees each check as it finishes. Never raises for a failed
    check (its traceback's last line is its detail); raises VgrtError where GPU mode cannot start."""
    if gpu and not torch.cuda.is_available():
        raise VgrtError(
            f"selftest --gpu needs a CUDA GPU, and torch {torch.__version__} sees none (a CPU build of torch, "
            "or no driver); run `vgrt selftest` without --gpu for the CPU checks"
        )
    names = _method_names(methods)
    if not gpu:
        # The kernel runs in Triton's interpreter: read when triton is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    result = Report("gpu" if gpu else "cpu")

    def record(checks: Iterator[Check]) -> None:
        for check in checks:
            result.checks.append(check)
            report(check)

    record(_kernel_checks(gpu))
    record(speed_checks(result.checks))
    with _exact_fp32():  # CUDA against CPU: cuDNN's TF32 convolutions alone would differ by more than the tolerance
        record(_method_checks(gpu, names, preset))
    record(_engine_checks(gpu))
    return result


@contextmanager
def _exact_fp32() -> Iterator[None]:
    """No TF32 in CUDA convolutions and matmuls inside the block (cuDNN allows it by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def write_report(report: Report, out_dir: str | Path) -> Path:
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    stamp = datetime.fromisoformat(data["created"]).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"selftest-{report.mode}-{stamp}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def _guarded(name: str, run: Callable[..., Check], *args: Any) -> Check:
    """The check `run(name, *args)` makes; a check that raises is failed, with the error as its detail."""
    try:
        return run(name, *args)
    except Exception as err:  # noqa: BLE001 - one broken check must not hide the others
        last = traceback.format_exception_only(err)[-1].strip()
        return Check(name, FAILED, last)


# --- the kernel ------------------------------------------------------------------------------------


def _kernel_checks(gpu: bool) -> Iterator[Check]:
    from vgrt._lazy import is_available

    if not is_available("triton"):
        yield Check("kernel", SKIPPED, "triton is not installed: pip install 'vgrt[gpu]'")
        return
    for size in GPU_SIZES if gpu else CPU_SIZES:
        for masked in (False, True):
            name = f"kernel {size.label} {'half the key tiles masked' if masked else 'dense'}"
            yield _guarded(name, _kernel_check, size, masked, gpu)


def half_masked_key_bias(size: AttentionSize, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A key mask [B, 1, 1, L] as an additive bias that masks every other key tile of the kernel."""
    from vgrt.plugins.masked_attention.triton_kernel import BLOCK_N

    tile = torch.arange(size.tokens, device=device) // BLOCK_N
    allowed = (tile % 2 == 0).expand(size.batch, 1, 1, size.tokens)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


def _kernel_check(name: str, size: AttentionSize, masked: bool, gpu: bool) -> Check:
    from vgrt.plugins.masked_attention.triton_kernel import block_mask_from_bias, masked_attention_triton
    from vgrt.plugins.masked_attention.trt_plugin import launch_plugin_kernel

    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    generator = torch.Generator(device).manual_seed(0)
    shape = (size.batch, size.heads, size.tokens, size.head_size)
    q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3))
    bias = half_masked_key_bias(size, dtype, device) if masked else None
    tiles = block_mask_from_bias(bias, size.tokens, size.tokens) if masked else None
    kernel = lambda: masked_attention_triton(q, k, v, bias, block_mask=tiles)
    expected = pytorch_reference(q.float(), k.float(), v.float(), None if bias is None else bias.float())
    errors = {"kernel_max_abs_diff": (kernel().float() - expected).abs().max().item()}
    if masked:
        scaled = q * size.head_size**-0.5  # the plugin's contract: q pre-scaled
        plugin_out = torch.empty_like(q)
        plugin = lambda: launch_plugin_kernel(scaled, k, v, bias.contiguous(), plugin_out)
        plugin()
        errors["plugin_max_abs_diff"] = (plugin_out.float() - expected).abs().max().item()
    tolerance = 2e-2 if dtype == torch.float16 else 1e-4
    values: dict[str, Any] = {**errors, "tolerance": tolerance}
    if gpu:
        sdpa_mask = None if bias is None else bias
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
        values.update(kernel_s=_gpu_seconds(kernel), sdpa_s=_gpu_seconds(sdpa))
        if masked:
            values["plugin_s"] = _gpu_seconds(plugin)
    bad = {key: value for key, value in errors.items() if not value <= tolerance}
    if bad:
        return Check(name, FAILED, f"differs from the reference by {bad} (tolerance {tolerance})", values)
    return Check(name, OK, "matches the reference", values)


def pytorch_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The PyTorch reference itself (`masked_attention` runs the kernel on CUDA, see its torch_op)."""
    from vgrt.plugins.masked_attention.reference import prescaled_masked_attention

    q = q * q.shape[-1] ** -0.5
    if bias is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    return prescaled_masked_attention(q, k, v, bias)


def _gpu_seconds(call: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    """Median seconds of `call` on the GPU, timed by CUDA events."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1000)
    return sorted(samples)[len(samples) // 2]


def speed_checks(checks: list[Check]) -> Iterator[Check]:
    """The timing targets, from the kernel checks of one size (dense and masked) measured on the GPU."""
    timed = {c.name: c for c in checks if c.name.startswith("kernel ") and "kernel_s" in c.values}
    for name, dense in timed.items():
        if not name.endswith(" dense"):
            continue
        label = name.removeprefix("kernel ").removesuffix(" dense")
        masked = timed.get(f"kernel {label} half the key tiles masked")
        ratios = {"dense_to_sdpa": dense.values["kernel_s"] / dense.values["sdpa_s"]}
        if masked is not None:
            ratios["masked_to_dense"] = masked.values["kernel_s"] / dense.values["kernel_s"]
            ratios["plugin_masked_to_dense"] = masked.values["plugin_s"] / dense.values["kernel_s"]
        missed = []
        if ratios["dense_to_sdpa"] > DENSE_TO_SDPA_TARGET:
            missed.append(f"dense kernel {ratios['dense_to_sdpa']:.2f}x SDPA (target <= {DENSE_TO_SDPA_TARGET})")
        if ratios.get("masked_to_dense", 0) > MASKED_TO_DENSE_TARGET:
            missed.append(
                f"masked {ratios['masked_to_dense']:.2f}x the dense kernel (target <= {MASKED_TO_DENSE_TARGET})"
            )
        detail = "; ".join(missed) or "meets the targets"
        yield Check(f"speed {label}", FAILED if missed else OK, detail, ratios)


# --- the methods -----------------------------------------------------------------------------------


def _method_names(methods: tuple[str, ...] | None) -> tuple[str, ...]:
    """The registry's method benchmarks to run: `methods`, or all of them."""
    from vgrt.runtime.methods.registry import BENCHMARKS

    names = methods or tuple(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise VgrtError(f"unknown method benchmark(s) {unknown}; choose from: {', '.join(BENCHMARKS)}")
    return names


def _method_checks(gpu: bool, names: tuple[str, ...], preset: str) -> Iterator[Check]:
    # GPU: torch on CUDA against torch on the CPU; CPU: torch against onnxruntime.
    expected_on = {"backend": "torch", "device": "cpu"} if gpu else {"backend": "onnxruntime", "device": "cpu"}
    got_on = {"backend": "torch", "device": "cuda"} if gpu else {"backend": "torch", "device": "cpu"}
    for name in names:
        check = (
            f"method {name} {got_on['backend']}/{got_on['device']} vs {expected_on['backend']}/{expected_on['device']}"
        )
        yield _guarded(check, _method_check, name, preset, got_on, expected_on)


METHOD_TOLERANCE = 2e-2  # largest |difference| of the images in [-1, 1], after a few steps of fp32


def _method_check(check: str, name: str, preset: str, got_on: dict, expected_on: dict) -> Check:
    images, seconds = [], []
    for where in (expected_on, got_on):
        started = time.perf_counter()
        images.append(compose_benchmark(name, preset, **where).float().cpu())
        seconds.append(time.perf_counter() - started)
    diff = (images[1] - images[0]).abs().max().item()
    values = {"max_abs_diff": diff, "tolerance": METHOD_TOLERANCE, "seconds": seconds}
    if not diff <= METHOD_TOLERANCE:
        return Check(check, FAILED, f"images differ by {diff:.3g} (tolerance {METHOD_TOLERANCE})", values)
    return Check(check, OK, f"images agree within {diff:.3g}", values)


def compose_benchmark(name: str, preset: str, backend: str, device: str, steps: int = 2) -> torch.Tensor:
    """The image of the registry's benchmark `name` at the preset's smallest size, a few steps."""
    from vgrt.bench.compose_methods import bench_request, example_images
    from vgrt.models.presets import get_preset
    from vgrt.runtime.composer import Composer
    from vgrt.runtime.methods.registry import Work

    model = get_preset(preset)
    with example_images(model, model.profile.latent.min * model.vae_factor) as examples:
        compose, request = bench_request(name, examples, Work(steps, gradient_steps=1))
    with Composer.from_preset(preset, backend=backend, device=device, progress=False) as composer:
        return compose(composer, request).image


# --- TensorRT and ONNX Runtime CUDA ----------------------------------------------------------------


def _engine_checks(gpu: bool) -> Iterator[Check]:
    if not gpu:
        return
    yield _guarded("tensorrt", _tensorrt_check)
    yield _guarded("onnxruntime cuda", _ort_cuda_check)


ENGINE_TOLERANCE = 1e-2  # relative error of an fp16 engine's noise prediction


def _tiny_export(dtype: str) -> Path:
    from vgrt.export.exporter import ExportSettings, export

    # Apart from the export cache: `export` replaces the folder atomically, so a rerun just exports again.
    directory = Path(os.environ.get("VGRT_SELFTEST_DIR", Path.home() / ".cache" / "vgrt" / "selftest")) / dtype
    return export(directory, ExportSettings(preset="tiny", features="all", dtype=dtype))


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float().cpu(), expected.float().cpu()
    return ((got - expected).norm() / expected.norm()).item()


def _engine_result(name: str, got: torch.Tensor, expected: torch.Tensor, values: dict) -> Check:
    error = _relative_error(got, expected)
    values = {**values, "relative_error": error, "tolerance": ENGINE_TOLERANCE}
    if not error <= ENGINE_TOLERANCE:
        return Check(name, FAILED, f"relative error {error:.3g} against onnxruntime on the CPU", values)
    return Check(name, OK, f"relative error {error:.3g} against onnxruntime on the CPU", values)


def _tensorrt_check(name: str) -> Check:
    from vgrt._lazy import is_available

    missing = [m for m in ("tensorrt", "polygraphy") if not is_available(m)]
    if missing:
        return Check(name, SKIPPED, f"{', '.join(missing)} not installed: pip install 'vgrt[trt]'")
    from vgrt.engines import open_runner
    from vgrt.engines.tensorrt import BuildSettings, SharedDeviceMemory, build_engine
    from vgrt.export import example_feed

    directory = _tiny_export("fp16")
    feed = example_feed(directory)
    with open_runner(directory, backend="onnxruntime") as cpu:
        expected = cpu.infer(feed)["noise_pred"]
    build_engine(directory, BuildSettings())
    feed = {k: v.cuda() for k, v in feed.items()}
    with open_runner(directory, backend="tensorrt", cuda_graph=True, shared_memory=SharedDeviceMemory()) as trt:
        outputs = [trt.infer(feed)["noise_pred"] for _ in range(3)]  # an execution, then graph replays
    replay_diff = max((o.float() - outputs[0].float()).abs().max().item() for o in outputs)
    return _engine_result(name, outputs[-1], expected, {"replay_max_abs_diff": replay_diff})


def _ort_cuda_check(name: str) -> Check:
    from vgrt._lazy import is_available

    if not is_available("onnxruntime"):
        return Check(name, SKIPPED, "onnxruntime is not installed")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return Check(
            name,
            SKIPPED,
            f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider: install onnxruntime-gpu",
        )
    from vgrt.engines import open_runner
    from vgrt.export import example_feed

    directory = _tiny_export("fp32")
    feed = example_feed(directory)
    with open_runner(directory, backend="onnxruntime") as cpu:
        expected = cpu.infer(feed)["noise_pred"]
    with open_runner(directory, backend="onnxruntime", provider="cuda") as cuda:
        got = cuda.infer({k: v.cuda() for k, v in feed.items()})["noise_pred"]
    return _engine_result(name, got, expected, {"output_device": str(got.device)})
