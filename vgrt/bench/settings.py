"""Settings of one `vgrt bench` run: defaults for full and --quick runs, all checked before any work."""

from dataclasses import dataclass, field

from vgrt.bench.backends import select_backends
from vgrt.bench.suites import get_suite
from vgrt.errors import InvalidInputError
from vgrt.models.features import canonical_features, features_text
from vgrt.models.presets import get_preset

DTYPES = ("fp32", "fp16")
Names = tuple[str, ...]
# Option names as the CLI spells them, for messages about options a suite does not take.
_FLAGS = {
    "presets": "--preset", "batches": "--batch", "latents": "--latent", "features": "--features",
    "dtypes": "--precision", "backends": "--backends", "export_dir": "--export-dir", "methods": "--methods",
    "quantised_dir": "--quantised", "feeds_dir": "--feeds", "plain_export_dir": "--plain-export-dir",
    "steps": "--steps", "gradient_steps": "--gradient-steps", "calibrated": "--calibrated",
}  # fmt: skip
COMPOSE_STEPS, QUICK_COMPOSE_STEPS = 20, 3
PEER_STEPS, QUICK_PEER_STEPS = 10, 2


@dataclass(frozen=True)
class TimingSettings:
    """warmup: untimed calls per competitor first (allocations, caches, lazy init are not what we time).
    repeats: timed calls per competitor, interleaved with the other competitors' calls."""

    warmup: int = 1
    repeats: int = 5


QUICK_TIMING = TimingSettings(warmup=1, repeats=2)


@dataclass(frozen=True)
class BenchSettings:
    """What one `vgrt bench` run measures. Empty batches/latents mean each preset's profile 'opt' size.
    methods, steps, gradient_steps: the compose suite's methods (names as `vgrt compose` spells them),
    schedule length, and PNO iterations / guidance steps (None: each method's default).
    feeds_dir, plain_export_dir: the unet suite's conditioned-against-plain mode (vgrt.bench.unet_feeds): a
    calibration set's captured feeds, and the plain export to time them against (None: from the cache).
    calibrated: the compose suite's INT8 UNets (`vgrt calibrate --out`), run by its *-int8 competitors."""

    suite: str
    backends: tuple[str, ...] = ()
    presets: tuple[str, ...] = ("sd15",)
    batches: tuple[int, ...] = ()
    latents: tuple[int, ...] = ()
    features: tuple[str, ...] = ("none",)
    dtypes: tuple[str, ...] = ("fp32",)
    timing: TimingSettings = field(default_factory=TimingSettings)
    threads: int = 0  # 0: PyTorch's default thread count; ONNX Runtime gets the same number
    quick: bool = False
    export_dir: str | None = None
    quantised_dir: str | None = None  # an INT8 export of `vgrt calibrate`, timed as the *-int8 competitors
    methods: tuple[str, ...] = ()
    steps: int | None = None
    gradient_steps: int | None = None
    feeds_dir: str | None = None
    plain_export_dir: str | None = None
    calibrated: tuple[str, ...] = ()


def make_settings(
    suite: str,
    *,
    backends: tuple[str, ...] | None = None,
    presets: tuple[str, ...] | None = None,
    batches: tuple[int, ...] | None = None,
    latents: tuple[int, ...] | None = None,
    features: tuple[str, ...] | None = None,
    dtypes: tuple[str, ...] | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    threads: int = 0,
    quick: bool = False,
    export_dir: str | None = None,
    quantised_dir: str | None = None,
    methods: tuple[str, ...] | None = None,
    steps: int | None = None,
    gradient_steps: int | None = None,
    feeds_dir: str | None = None,
    plain_export_dir: str | None = None,
    calibrated: tuple[str, ...] | None = None,
) -> BenchSettings:
    """Checked settings; None means "not given": the suite's default (smaller with `quick`)."""
    spec = get_suite(suite)
    given = {
        "backends": backends, "presets": presets, "batches": batches, "latents": latents,
        "features": features, "dtypes": dtypes, "export_dir": export_dir, "quantised_dir": quantised_dir,
        "methods": methods, "steps": steps, "gradient_steps": gradient_steps, "feeds_dir": feeds_dir,
        "plain_export_dir": plain_export_dir, "calibrated": calibrated,
    }  # fmt: skip
    refused = [_FLAGS[name] for name, value in given.items() if value is not None and name not in spec.options]
    if refused:
        taken = ", ".join(_FLAGS[o] for o in _FLAGS if o in spec.options) or "none"
        raise InvalidInputError(f"the {suite} suite does not take {', '.join(refused)}; it takes: {taken}")
    default = QUICK_TIMING if quick else TimingSettings()
    if quick and suite == "export":
        default = TimingSettings(repeats=1)  # one sample is a whole export in a fresh process (~30 s on tiny)
    timing = TimingSettings(
        default.warmup if warmup is None else warmup, default.repeats if repeats is None else repeats
    )
    if timing.warmup < 1 or timing.repeats < 1:
        raise InvalidInputError(f"--warmup and --repeats must be >= 1, got {timing.warmup} and {timing.repeats}")
    if threads < 0:
        raise InvalidInputError(f"--threads must be >= 0 (0: PyTorch's default), got {threads}")
    if features is not None:
        features = tuple(canonical_features(f) for f in features)
    if export_dir is not None:
        presets, features, dtypes = _from_export(export_dir, presets, features, dtypes)
    if feeds_dir is not None or plain_export_dir is not None:
        presets = _feeds_preset(feeds_dir, plain_export_dir, export_dir, presets, given)
    settings = BenchSettings(
        suite=suite,
        backends=_without_unasked_int8(select_backends(spec, backends), backends, quantised_dir or calibrated),
        presets=presets or _default_presets(suite, quick),
        batches=batches or (),
        latents=latents or (),
        features=features or ("none",),
        dtypes=dtypes or ("fp32",),
        timing=timing,
        threads=threads,
        quick=quick,
        export_dir=export_dir,
        quantised_dir=quantised_dir,
        feeds_dir=feeds_dir,
        plain_export_dir=plain_export_dir,
        calibrated=calibrated or (),
        **(_compose_options(methods, steps, gradient_steps, quick) if suite == "compose" else {}),
        **(_peer_options(presets, steps, quick) if suite == "peer" else {}),
    )
    _check_models(settings)
    if suite == "compose":
        from vgrt.bench.compose_int8 import calibrated_per_method

        calibrated_per_method(settings.methods, settings.presets, settings.backends, settings.calibrated)
    else:
        _check_quantised(settings)
    return settings


QUANTISED_BACKENDS = ("onnxruntime-int8", "openvino-int8")
_FIXED_BY_FEEDS = ("batches", "latents", "features", "dtypes", "quantised_dir")


def _feeds_preset(
    feeds_dir: str | None, plain_export_dir: str | None, export_dir: str | None, presets: Names | None, given: dict
) -> Names:
    """The preset of the --feeds set; --plain-export-dir, --export-dir and --preset must agree with it, and
    the options the captured feeds fix are refused."""
    from vgrt.calibration.dataset import read_set
    from vgrt.export.manifest import read_manifest

    if feeds_dir is None:
        raise InvalidInputError(
            "--plain-export-dir is what the conditioned UNet is timed against on captured feeds: give --feeds SET too"
        )
    fixed = [_FLAGS[name] for name in _FIXED_BY_FEEDS if given[name] is not None]
    if fixed:
        raise InvalidInputError(
            f"--feeds times the captured feeds as they are, so it does not take {', '.join(fixed)}: their batch, "
            "latent size, feature set and precision are the capture's"
        )
    preset = read_set(feeds_dir).model["preset"]
    exports = {"--plain-export-dir": plain_export_dir, "--export-dir": export_dir}
    found = {flag: (read_manifest(d).data["preset"],) for flag, d in exports.items() if d is not None}
    if presets is not None and export_dir is None:
        found["--preset"] = tuple(presets)
    for flag, value in found.items():
        if value != (preset,):
            raise InvalidInputError(
                f"{flag} is {','.join(value)} and the --feeds set {feeds_dir!r} was captured on {preset}: give "
                f"{flag} of {preset}, or a set captured on {','.join(value)}"
            )
    if plain_export_dir is not None:
        features = features_text(frozenset(read_manifest(plain_export_dir).component("unet").features))
        if features != "none":
            raise InvalidInputError(
                f"--plain-export-dir {plain_export_dir!r} carries the features {features}; the plain UNet has none: "
                f"export it with `vgrt export --preset {preset} --features none`"
            )
    return (preset,)


def _without_unasked_int8(selected: tuple[str, ...], requested, quantised) -> tuple[str, ...]:
    """Every available backend, when none is named, means the INT8 ones only where an INT8 export is given."""
    if requested is not None or quantised:
        return selected
    return tuple(b for b in selected if b not in QUANTISED_BACKENDS)


def _check_quantised(settings: BenchSettings) -> None:
    """The *-int8 competitors and --quantised come together, and the INT8 export is of the model timed."""
    timed = [b for b in settings.backends if b in QUANTISED_BACKENDS]
    if settings.quantised_dir is None:
        if timed:
            raise InvalidInputError(
                f"{', '.join(timed)} time an INT8 export: give it with --quantised DIR (the --out of vgrt calibrate)"
            )
        return
    if not timed:
        raise InvalidInputError(f"--quantised is timed as {' or '.join(QUANTISED_BACKENDS)}: add one to --backends")
    from vgrt.export.manifest import read_manifest

    manifest = read_manifest(settings.quantised_dir)
    if manifest.data.get("precision") != "int8":
        raise InvalidInputError(
            f"--quantised {settings.quantised_dir!r} holds a {manifest.data.get('precision', 'float')} export, not "
            "an INT8 one; give the --out of `vgrt calibrate --target cpu`"
        )
    found = (manifest.data["preset"], features_text(frozenset(manifest.component("unet").features)))
    if (settings.presets, settings.features) != ((found[0],), (found[1],)):
        raise InvalidInputError(
            f"--quantised {settings.quantised_dir!r} is {found[0]} with features {found[1]}, and the run times "
            f"{','.join(settings.presets)} with {','.join(settings.features)}: give the export of the same model "
            "(--export-dir) or --preset and --features that match"
        )


def _compose_options(
    methods: tuple[str, ...] | None, steps: int | None, gradient_steps: int | None, quick: bool
) -> dict:
    from vgrt.bench.compose_methods import METHODS

    unknown = [m for m in methods or () if m not in METHODS]
    if unknown:
        raise InvalidInputError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(METHODS)}")
    if steps is not None and steps < 1:
        raise InvalidInputError(f"--steps must be >= 1, got {steps}")
    if gradient_steps is not None and gradient_steps < 1:
        raise InvalidInputError(f"--gradient-steps must be >= 1, got {gradient_steps}")
    return {
        "gradient_steps": gradient_steps,
        "methods": tuple(dict.fromkeys(methods)) if methods else tuple(METHODS),
        "steps": steps or (QUICK_COMPOSE_STEPS if quick else COMPOSE_STEPS),
    }


def _peer_options(presets: tuple[str, ...] | None, steps: int | None, quick: bool) -> dict:
    if presets is not None and len(presets) != 1:
        raise InvalidInputError(f"the peer suite runs one preset at a time, got --preset {','.join(presets)}")
    if steps is not None and steps < 1:
        raise InvalidInputError(f"--steps must be >= 1, got {steps}")
    return {"steps": steps or (QUICK_PEER_STEPS if quick else PEER_STEPS)}


def _default_presets(suite: str, quick: bool) -> tuple[str, ...]:
    if quick:
        return ("tiny",)
    return ("sd15", "sdxl") if suite == "attention" else ("sd15",)


def _check_models(settings: BenchSettings) -> None:
    unknown = [d for d in settings.dtypes if d not in DTYPES]
    if unknown:
        raise InvalidInputError(
            f"unknown --precision {', '.join(map(repr, unknown))}; choose from: {', '.join(DTYPES)} (bf16 is timed "
            "as the competitors torch-bf16 and openvino-bf16)"
        )
    for name in settings.presets:
        preset = get_preset(name)
        for batch in settings.batches:
            r = preset.profile.batch
            if not r.min <= batch <= r.max:
                raise InvalidInputError(f"--batch {batch} is outside the {name} profile [{r.min}, {r.max}]")
        for latent in settings.latents:
            r, factor = preset.profile.latent, preset.latent_factor
            if not r.min <= latent <= r.max or latent % factor:
                raise InvalidInputError(
                    f"--latent {latent} does not fit {name}: latents are multiples of {factor} in [{r.min}, {r.max}]"
                )


def _from_export(
    directory: str, presets: Names | None, features: Names | None, dtypes: Names | None
) -> tuple[Names, Names, Names]:
    """Preset, features and dtype of an existing export; given values must agree with it."""
    from vgrt.export.manifest import read_manifest

    manifest = read_manifest(directory)
    found = {
        "--preset": (manifest.data["preset"],),
        "--features": (features_text(frozenset(manifest.component("unet").features)),),
        "--precision": (manifest.data["settings"]["dtype"],),
    }
    asked = {"--preset": presets, "--features": features, "--precision": dtypes}
    for flag, value in asked.items():
        if value is not None and tuple(value) != found[flag]:
            raise InvalidInputError(
                f"{flag} {','.join(value)} disagrees with --export-dir {directory!r}, which holds {found[flag][0]}; "
                f"drop {flag} or export again"
            )
    return found["--preset"], found["--features"], found["--precision"]
