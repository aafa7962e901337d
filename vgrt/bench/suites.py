"""The benchmark suites `vgrt bench` knows: what each times, which options and backends it takes,
and, for a suite that cannot run yet, why."""

from dataclasses import dataclass

from vgrt.errors import InvalidInputError


@dataclass(frozen=True)
class Suite:
    """One suite. `module` has `run(settings) -> SuiteOutput`; `unavailable` says why it cannot run."""

    name: str
    summary: str
    module: str | None
    options: frozenset[str] = frozenset()  # BenchSettings fields the suite reads (besides timing)
    backends: tuple[str, ...] = ()
    unavailable: str | None = None


SUITES: dict[str, Suite] = {
    "unet": Suite(
        "unet",
        "one UNet call per backend, preset, batch, latent size, feature set and precision",
        "vgrt.bench.unet_suite",
        frozenset({"presets", "batches", "latents", "features", "dtypes", "backends", "export_dir"}),
        ("torch", "onnxruntime", "onnxruntime-cuda", "tensorrt"),
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
        "end-to-end composition per method (inversion, denoising, guidance steps)",
        None,
        unavailable="not built yet (the methods it would time, MCA-Ctrl and LocRef, have landed)",
    ),
}


def describe_suites() -> str:
    """One line per suite, unavailable ones with their reason: for --help and error messages."""
    return "; ".join(
        f"{s.name} (unavailable: {s.unavailable})" if s.unavailable else f"{s.name} ({s.summary})"
        for s in SUITES.values()
    )


def get_suite(name: str) -> Suite:
    """The runnable suite called `name`; an unknown or unavailable one raises, listing the others."""
    suite = SUITES.get(name)
    if suite is None:
        raise InvalidInputError(f"unknown bench suite {name!r}; the suites are: {describe_suites()}")
    if suite.unavailable:
        runnable = ", ".join(s.name for s in SUITES.values() if not s.unavailable)
        raise InvalidInputError(f"the {name} suite cannot run: {suite.unavailable}; runnable suites: {runnable}")
    return suite
