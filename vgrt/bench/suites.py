"""The benchmark suites `vgrt bench` knows: what each times, and which options and backends it takes."""

from dataclasses import dataclass

from vgrt.errors import InvalidInputError


@dataclass(frozen=True)
class Suite:
    """One suite. `module` has `run(settings) -> SuiteOutput`."""

    name: str
    summary: str
    module: str
    options: frozenset[str] = frozenset()  # BenchSettings fields the suite reads (besides timing)
    backends: tuple[str, ...] = ()


UNET_OPTIONS = ("presets", "batches", "latents", "features", "dtypes", "backends", "export_dir", "quantised_dir",
                "feeds_dir", "plain_export_dir")  # fmt: skip

SUITES: dict[str, Suite] = {
    "unet": Suite(
        "unet",
        "one UNet call per backend, preset, batch, latent size, feature set and precision; with --feeds, the "
        "conditioned UNet against the plain one on captured method feeds",
        "vgrt.bench.unet_suite",
        frozenset(UNET_OPTIONS),
        (
            "torch",
            "torch-bf16",
            "onnxruntime",
            "openvino",
            "openvino-bf16",
            "openvino-dynamic",
            "onnxruntime-int8",
            "openvino-int8",
            "onnxruntime-cuda",
            "tensorrt",
        ),
    ),
    "attention": Suite(
        "attention",
        "masked_attention alone at the presets' self- and cross-attention sizes, dense and at several mask densities",
        "vgrt.bench.attention_suite",
        frozenset({"presets", "batches", "latents", "dtypes", "backends"}),
        ("torch", "onnxruntime", "onnxruntime-cuda", "triton"),
    ),
    "export": Suite(
        "export",
        "export time and peak memory of `vgrt export`, each export in a fresh process",
        "vgrt.bench.export_suite",
        frozenset({"presets", "features", "dtypes"}),
    ),
    "compose": Suite(
        "compose",
        "one composition per method end to end: seconds per stage, host work per UNet step, "
        "seconds per gradient step and PyTorch's share, final latents' error and image PSNR; with --calibrated, "
        "each method's INT8 UNet too",
        "vgrt.bench.compose_suite",
        frozenset({"presets", "latents", "backends", "methods", "steps", "gradient_steps", "calibrated"}),
        ("torch", "onnxruntime", "openvino", "openvino-bf16", "onnxruntime-int8", "openvino-int8"),
    ),
    "peer": Suite(
        "peer",
        "plain text-to-image against optimum-intel's OVStableDiffusionPipeline on the same weights, noise and "
        "steps, each sample in a fresh process",
        "vgrt.bench.peer_suite",
        frozenset({"presets", "latents", "backends", "steps"}),
        ("torch", "vgrt-onnxruntime", "vgrt-openvino", "vgrt-openvino-bf16", "optimum-intel", "optimum-intel-bf16"),
    ),
}


def describe_suites() -> str:
    """One line per suite: for --help and error messages."""
    return "; ".join(f"{s.name} ({s.summary})" for s in SUITES.values())


def get_suite(name: str) -> Suite:
    """The suite called `name`; an unknown one raises, listing the suites."""
    suite = SUITES.get(name)
    if suite is None:
        raise InvalidInputError(f"unknown bench suite {name!r}; the suites are: {describe_suites()}")
    return suite
