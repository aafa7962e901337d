"""`vgrt bench peer`: vgrt's text-to-image competitors, each sample a fresh process, against PyTorch eager
on the same diffusers folder; optimum-intel itself only in the slow test (its environment is installed
from the package index on first use)."""

import pytest

from tests.bench.helpers import results_by_backend, run_bench
from vgrt.bench.peer_suite import _same_precision_ratios
from vgrt.bench.results import Measurement
from vgrt.bench.settings import make_settings
from vgrt.errors import InvalidInputError


@pytest.mark.slow  # two minutes on a 2-core CPU: the folder's three components exported in a child
def test_vgrt_competitors_run_in_processes_of_their_own(tmp_path):
    run, stdout, _ = run_bench(
        "peer", "--quick", "--preset", "tiny", "--backends", "torch,vgrt-openvino", "--repeats", "1", out=tmp_path
    )
    by_backend = results_by_backend(run)
    assert set(by_backend) == {"torch", "vgrt-openvino"}
    (openvino,) = by_backend["vgrt-openvino"]
    assert openvino["max_abs_diff"] < 1e-4  # the same image as PyTorch eager, in [0, 1] pixel units
    assert len(openvino["samples_s"]) == len(openvino["peak_rss_bytes"]) == 1
    assert openvino["peak_rss_bytes"][0] > 0
    assert run["cases"][0]["params"] == {"preset": "tiny", "size": "32x32", "steps": 2}
    assert set(run["details"]["stages_s"]["vgrt-openvino"][0]) == {"encode", "denoise", "decode"}
    assert run["details"]["vgrt_over_optimum_intel"] == {}  # optimum-intel was not asked for
    assert "peak RSS" in stdout


def test_ratios_pair_competitors_of_the_same_precision():
    def timed(name: str, seconds: float) -> Measurement:
        return Measurement(name, name, (seconds,))

    measured = (timed("torch", 4.0), timed("vgrt-openvino", 2.0), timed("optimum-intel", 2.5),
                timed("vgrt-openvino-bf16", 1.0))  # fmt: skip
    assert _same_precision_ratios(measured) == {"fp32": 0.8}  # bf16 has no optimum-intel run to pair with


def test_peer_suite_takes_one_preset():
    with pytest.raises(InvalidInputError, match="one preset at a time, got --preset tiny,sd15"):
        make_settings("peer", presets=("tiny", "sd15"), backends=("torch",))


@pytest.mark.slow
def test_optimum_intel_runs_on_the_same_folder(tmp_path):
    run, _, _ = run_bench(
        "peer", "--quick", "--preset", "tiny", "--backends", "torch,vgrt-openvino,optimum-intel", "--repeats", "1",
        out=tmp_path,
    )  # fmt: skip
    by_backend = results_by_backend(run)
    assert by_backend["optimum-intel"][0]["samples_s"][0] > 0
    assert set(run["details"]["vgrt_over_optimum_intel"]) == {"fp32"}
    assert run["details"]["optimum_intel_versions"]["optimum-intel"]
