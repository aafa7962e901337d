"""A calibration set on disk: the UNet feeds of captured method runs, one safetensors shard per run and
UNet layout (a method run may call UNets of several feature sets: MCA-Ctrl inverts with the plain UNet).

    calib/
      calibration.json        what was captured: the model, and per entry (one run's calls of one UNet
                              feature set) its run, method, seed, steps, size, feature set, input names and
                              shapes, call and sample counts, shard size and sha256
      run-<key>.safetensors   the entry's samples: tensor "<index>/<input name>" for each captured UNet call

Format 1 (sets captured before runs kept every layout) has one entry per run, the method's own layout,
keyed by the run; it reads as entries whose run is their own key. Format 2 keys an entry
`<run key>.<features>` and names its run.

An entry is trusted exactly when the manifest lists it: its shard is written under a temporary name and
renamed into place, then the manifest is rewritten the same way, once for all of a run's entries. A capture
killed midway therefore leaves at most unlisted shards or a temporary file, which the next writer removes
(it holds the set's lock, `vgrt.export.staging.target_lock`), and a re-run captures only the runs the
manifest does not list yet.
"""

import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vgrt.errors import ArtifactError, InvalidInputError
from vgrt.export.staging import describe_os_error, target_lock
from vgrt.export.verify import file_sha256

log = logging.getLogger(__name__)

SET_MANIFEST = "calibration.json"
SET_FORMAT = 2
READ_FORMATS = (1, 2)  # 1: one entry per run (its method's own layout); both read with the same meaning
_SHARD = re.compile(r"run-[0-9a-z._+-]+\.safetensors")


@dataclass(frozen=True)
class CapturedRun:
    """One method run's captured calls of one UNet layout (feature set): an entry of the set."""

    key: str  # the entry's: its run's key, and for format 2 its feature set (`layout_key`)
    method: str
    seed: int | None  # the sampling seed; None for methods that start from an inversion
    steps: int
    size: tuple[int, int]  # width, height in pixels
    features: str  # the UNet feature set that ran these calls (vgrt.models.features): "none" for the plain UNet
    inputs: dict[str, dict[str, Any]]  # input name -> {"dtype", "shape"} of the first sample
    calls: int  # calls of this UNet the run made (format 1: of all its UNets)
    samples: int  # of them captured
    shard: str
    bytes: int
    sha256: str
    run: str | None = None  # the method run's key (method and a digest of the request); None: `key` (format 1)

    @property
    def run_key(self) -> str:
        return self.run or self.key


def layout_key(run_key: str, features: str) -> str:
    """The key of a run's entry for the UNet of `features` (a name for its shard: no commas)."""
    return f"{run_key}.{features.replace(',', '+')}"


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration set read from its manifest; samples are read from the shards on demand, each
    shard checked against its recorded size and sha256 first."""

    directory: Path
    model: dict[str, Any]  # {"preset", "weights", "seed"}: the weights the feeds were computed with
    runs: dict[str, CapturedRun]

    def __len__(self) -> int:
        return sum(run.samples for run in self.runs.values())

    def runs_for(self, input_names: set[str] | frozenset[str]) -> list[CapturedRun]:
        """The runs whose UNet takes exactly these inputs (the feed of another feature set does not fit)."""
        return [run for run in self.runs.values() if set(run.inputs) == set(input_names)]

    def samples(self, runs: list[CapturedRun] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The feeds of `runs` (default: all), run by run in the manifest's order, calls in capture order."""
        from safetensors.torch import load_file

        for run in self.runs.values() if runs is None else runs:
            path = self.directory / run.shard
            _verify_shard(path, run)
            tensors = load_file(path)
            for index in range(run.samples):
                yield {name: tensors[f"{index}/{name}"] for name in run.inputs}

    def layouts(self, method: str) -> list[str]:
        """The UNet feature sets of `method`'s calls in the set, in the manifest's order."""
        return list(dict.fromkeys(run.features for run in self.runs.values() if run.method == method))

    def describe(self) -> dict[str, Any]:
        """A short record for an export's manifest: where the set is and what it holds."""
        return {
            "directory": str(self.directory.resolve()),
            "samples": len(self),
            "runs": [
                {"method": r.method, "seed": r.seed, "steps": r.steps, "size": list(r.size), "features": r.features,
                 "samples": r.samples}
                for r in self.runs.values()
            ],
        }  # fmt: skip


def read_set(directory: str | Path) -> CalibrationSet:
    """The calibration set in `directory`; ArtifactError naming the fix when it has none or a damaged manifest."""
    directory = Path(directory)
    path = directory / SET_MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{str(directory)!r} holds no calibration set (no {SET_MANIFEST}); capture one with "
            f"`vgrt calibrate METHOD --capture-only --set {directory}`"
        )
    try:
        data = json.loads(path.read_text())
        runs = {key: _run_from_json(run) for key, run in data["runs"].items()}
        model = dict(data["model"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ArtifactError(
            f"{str(path)!r} is not a readable calibration manifest ({type(err).__name__}: {err}); remove the "
            "folder and capture again"
        ) from err
    if data.get("format_version") not in READ_FORMATS:
        raise ArtifactError(
            f"{str(path)!r} has format_version {data.get('format_version')!r}, this vgrt reads "
            f"{' and '.join(map(str, READ_FORMATS))}; capture the set again"
        )
    return CalibrationSet(directory, model, runs)


class SetWriter:
    """Adds runs to a calibration set; made by `open_for_capture`, which holds the set's lock."""

    def __init__(self, directory: Path, model: dict[str, Any], runs: dict[str, CapturedRun]):
        self.directory, self.model, self.runs = directory, model, dict(runs)

    def add_run(self, run: CapturedRun, samples: list[dict[str, torch.Tensor]]) -> CapturedRun:
        """Write the entry's shard, then list it in the manifest; returns the entry with its shard's stamp."""
        return self.add_entries([(run, samples)])[0]

    def add_entries(self, entries: list[tuple[CapturedRun, list[dict[str, torch.Tensor]]]]) -> list[CapturedRun]:
        """Write each entry's shard, then list them all in the manifest at once (a run's layouts: all or none)."""
        written = [self._write_shard(run, samples) for run, samples in entries]
        self.runs.update((run.key, run) for run in written)
        _write_manifest(self.directory, self.model, self.runs)
        return written

    def _write_shard(self, run: CapturedRun, samples: list[dict[str, torch.Tensor]]) -> CapturedRun:
        from safetensors.torch import save_file

        shard = self.directory / f"run-{run.key}.safetensors"
        tensors = {f"{i}/{name}": value.contiguous() for i, feed in enumerate(samples) for name, value in feed.items()}
        temporary = self.directory / f".{shard.name}.tmp-{secrets.token_hex(4)}"
        try:
            save_file(tensors, temporary, metadata={"run": run.key, "method": run.method})
            os.replace(temporary, shard)
        finally:
            temporary.unlink(missing_ok=True)
        stat = shard.stat()
        return CapturedRun(**{**asdict(run), "shard": shard.name, "bytes": stat.st_size, "sha256": file_sha256(shard)})


@contextmanager
def open_for_capture(directory: str | Path, model: dict[str, Any]) -> Iterator[SetWriter]:
    """Hold the set's lock and yield a writer over its runs; what an interrupted capture left is removed
    first. A set captured from other weights is refused: its feeds would calibrate another model."""
    directory = Path(directory)
    with ExitStack() as stack:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            stack.enter_context(target_lock(directory))
        except OSError as err:
            raise InvalidInputError(
                f"cannot write a calibration set at {str(directory)!r} ({describe_os_error(err)}); choose another --set"
            ) from err
        runs = {}
        if (directory / SET_MANIFEST).exists():
            existing = read_set(directory)
            if existing.model != model:
                raise InvalidInputError(
                    f"the calibration set {str(directory)!r} was captured with {existing.model}, not {model}; "
                    "choose another --set for this model"
                )
            runs = existing.runs
        _remove_untrusted(directory, runs)
        yield SetWriter(directory, model, runs)


def _remove_untrusted(directory: Path, runs: dict[str, CapturedRun]) -> None:
    """Remove temporary files and shards the manifest does not list: what an interrupted capture left."""
    listed = {run.shard for run in runs.values()}
    for path in directory.iterdir():
        leftover = path.name.startswith(".run-") or path.name.startswith(f".{SET_MANIFEST}.tmp-")
        if leftover or (_SHARD.fullmatch(path.name) and path.name not in listed):
            log.info("removing %s, left by an interrupted capture", path)
            path.unlink()


def _write_manifest(directory: Path, model: dict[str, Any], runs: dict[str, CapturedRun]) -> None:
    data = {"format_version": SET_FORMAT, "model": model, "runs": {key: asdict(run) for key, run in runs.items()}}
    temporary = directory / f".{SET_MANIFEST}.tmp-{secrets.token_hex(4)}"
    try:
        temporary.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(temporary, directory / SET_MANIFEST)
    finally:
        temporary.unlink(missing_ok=True)


def _run_from_json(data: dict[str, Any]) -> CapturedRun:
    return CapturedRun(**{**data, "size": tuple(data["size"])})


def _verify_shard(path: Path, run: CapturedRun) -> None:
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ArtifactError(
            f"{str(path)!r}, listed in its calibration manifest, cannot be read ({describe_os_error(err)}); "
            "capture the set again"
        ) from err
    if size != run.bytes or file_sha256(path) != run.sha256:
        raise ArtifactError(
            f"{str(path)!r} changed since it was captured (size or sha256 differs from its manifest); "
            "capture the set again"
        )
