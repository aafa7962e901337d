"""The compose suite's INT8 competitors: each method with the INT8 UNet `vgrt calibrate` made from its own
UNet feeds, the other components in fp32 from the export cache, as `vgrt compose --precision int8
--calibrated DIR` runs them.

    vgrt bench compose --backends openvino-int8 --methods vcf --calibrated VCF_INT8

A --calibrated folder goes to the methods among its manifest's calibration runs (a variant such as vcf-pno
by its method, vcf), on the preset it quantises. Everything is checked from the manifests before any export
or timing: each int8 competitor's backend opens every folder, every timed method has a folder calibrated on
it that quantises a UNet it runs, and the folders are of the timed model.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgrt.errors import InvalidInputError

INT8_COMPETITORS = {"onnxruntime-int8": "onnxruntime", "openvino-int8": "openvino"}  # competitor -> backend


@dataclass(frozen=True)
class CalibratedUNet:
    """A --calibrated folder as its manifest describes it."""

    folder: Path
    preset: str
    features: frozenset[str]
    methods: tuple[str, ...]  # the methods whose feeds calibrated it
    held_out_relative_error: float | None  # the INT8 UNet's output error on feeds held out of calibration

    def describe(self) -> dict[str, Any]:
        """Its record in the suite's JSON."""
        from vgrt.models.features import features_text

        return {
            "folder": str(self.folder),
            "features": features_text(self.features),
            "calibrated_on": list(self.methods),
            "held_out_relative_error": self.held_out_relative_error,
        }


def read_calibrated(folder: str | Path) -> CalibratedUNet:
    from vgrt.export.manifest import read_manifest

    manifest = read_manifest(folder)
    quantization = manifest.data["quantization"]
    runs = quantization["calibration"].get("runs", [])
    return CalibratedUNet(
        Path(folder),
        manifest.data["preset"],
        frozenset(manifest.component("unet").features),
        tuple(dict.fromkeys(run["method"] for run in runs)),
        quantization.get("held_out_relative_error"),
    )


def calibrated_per_method(
    methods: tuple[str, ...], presets: tuple[str, ...], competitors: tuple[str, ...], folders: tuple[str, ...]
) -> dict[tuple[str, str], tuple[CalibratedUNet, ...]]:
    """{(method, preset): the --calibrated folders its int8 competitors run}; refuses, naming the fix,
    --calibrated without an int8 competitor, a folder an int8 competitor's backend does not open, and a
    method without a folder calibrated on it. Reads manifests only."""
    from vgrt.engines.engine_set import calibrated_unets, check_calibrated
    from vgrt.models.source import ModelSource

    timed = [c for c in competitors if c in INT8_COMPETITORS]
    if folders and not timed:
        raise InvalidInputError(
            f"--calibrated gives the INT8 UNets of the competitors {' and '.join(INT8_COMPETITORS)}, and --backends "
            f"times {', '.join(competitors)}: add one of them to --backends, or leave --calibrated out"
        )
    if not timed:
        return {}
    for competitor in timed:
        check_calibrated(folders, INT8_COMPETITORS[competitor])
    unets = [read_calibrated(folder) for folder in folders]
    found = {}
    for preset in presets:
        for method in methods:
            given = tuple(u for u in unets if u.preset == preset and _method_of(method).name in u.methods)
            if not given:
                raise InvalidInputError(_missing(method, preset, timed, unets))
            _check_runs_them(method, given)
            calibrated_unets([u.folder for u in given], ModelSource(preset))  # the timed model, one per feature set
            found[(method, preset)] = given
    return found


def composer_options(backend: str, calibrated: Sequence[str | Path]) -> dict[str, Any]:
    """The Composer settings that run `calibrated` on `backend` beside its backend and runner options, as
    `vgrt compose --precision int8 --calibrated DIR` makes them (both from vgrt.precision.precision_settings):
    the INT8 UNets in place of the UNets of their features, the other components in fp32 exports."""
    from vgrt.precision import precision_settings

    return precision_settings("int8", backend, calibrated)


def _method_of(name: str):
    """The registry method a benchmark runs (vcf for vcf-pno)."""
    from vgrt.runtime.methods.registry import BENCHMARKS

    return BENCHMARKS[name][0]


def _check_runs_them(name: str, given: tuple[CalibratedUNet, ...]) -> None:
    """Refuse a folder whose UNet the method never opens: its int8 competitor would run fp32 under an int8 name."""
    from vgrt.models.features import features_text, parse_features

    method = _method_of(name)
    runs = {parse_features(method.features)} | ({frozenset()} if "unet" in method.components else set())
    for unet in given:
        if unet.features not in runs:
            raise InvalidInputError(
                f"--calibrated {str(unet.folder)!r} quantises the UNet with features {features_text(unet.features)}, "
                f"and {name} runs the UNet with {' and '.join(sorted(map(features_text, runs)))}: make one with "
                f"`vgrt calibrate {method.name} --preset {unet.preset} --out DIR`, then give --calibrated DIR"
            )


def _missing(method: str, preset: str, competitors: list[str], unets: list[CalibratedUNet]) -> str:
    """Why `method` has no INT8 UNet, and the commands that make and give one."""
    name = _method_of(method).name
    if unets:
        held = "; ".join(f"{u.folder} ({u.preset}, calibrated on {', '.join(u.methods) or 'no method'})" for u in unets)
        seen = f"none of the --calibrated folders was calibrated on {name} for {preset} (they are: {held})"
    else:
        seen = "no --calibrated folder was given"
    run = "runs" if len(competitors) == 1 else "run"
    return (
        f"{' and '.join(competitors)} {run} {method} on {preset} with an INT8 UNet calibrated on {name}, and {seen}: "
        f"make one with `vgrt calibrate {name} --preset {preset} --out DIR`, then give --calibrated DIR (repeatable), "
        f"or leave {method} out of --methods"
    )
