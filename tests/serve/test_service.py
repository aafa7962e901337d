"""The compose routes without Ray: the same image as `vgrt compose`, the CLI's checks as 4xx, 5xx without
server internals, and settings refused before any export."""

import asyncio
import json

import pytest

from vgrt._lazy import is_available
from vgrt.cli import main
from vgrt.client import multipart
from vgrt.errors import InvalidInputError, WeightsError
from vgrt.serve.service import ComposeService, ServeSettings

from ..cli_args import mca_ctrl_args


@pytest.fixture(scope="module")
def service(composer_cache):
    settings = ServeSettings(backend="onnxruntime", cache=str(composer_cache), methods=("mca-ctrl",))
    service = ComposeService(settings)  # warmup: compose
    service.load()
    yield service
    service.close()


def _mca_ctrl_inputs(examples, **extra):
    files = {"subject": "subject.png", "subject_mask": "subject_mask.png", "condition": "scene.png",
             "region_mask": "region_mask.png"}  # fmt: skip
    return {name: (examples / file).read_bytes() for name, file in files.items()} | extra


def _post(service, method: str, inputs: dict, accept: str = "image/png"):
    body, content_type = multipart(inputs)
    headers = {"content-type": content_type, "accept": accept}
    return asyncio.run(service.handle("POST", f"/compose/{method}", headers, body, "test-id"))


def test_served_image_is_the_one_vgrt_compose_writes(service, examples, tmp_path, composer_cache):
    reply = _post(service, "mca-ctrl", _mca_ctrl_inputs(examples, steps=2, seed=7))
    assert reply.status == 200 and reply.headers["content-type"] == "image/png"
    assert set(json.loads(reply.headers["x-vgrt-timings"])) == {"encode", "invert", "denoise", "decode"}
    out = tmp_path / "cli.png"
    assert (
        main(mca_ctrl_args(examples, out, "--seed", "7", "--backend", "onnxruntime", "--cache", str(composer_cache)))
        == 0
    )
    assert reply.body == out.read_bytes()  # pixels and provenance alike


def test_json_accept_returns_the_image_timings_and_request_id(service, examples):
    reply = _post(service, "mca-ctrl", _mca_ctrl_inputs(examples, steps=1), accept="application/json")
    payload = json.loads(reply.body)
    assert reply.status == 200 and payload["request_id"] == "test-id" and payload["image"]
    assert payload["timings"]["denoise"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"size": "30x30"}, "width 30 is not usable"),
        ({"steps": "two"}, "--steps 'two' is not a whole number"),
        ({"seed": "-1"}, "seed must be a whole number in [0, 2**64 - 1], got -1"),
        ({"mode": "draw"}, "--mode 'draw' is not one of: edit, generate"),
        ({"colour": "red"}, "mca-ctrl takes no input 'colour'"),
        ({"subject_mask": b"not an image"}, "'subject_mask' is not a readable image"),
    ],
)
def test_what_vgrt_compose_refuses_is_a_400_with_its_message(service, examples, extra, message):
    reply = _post(service, "mca-ctrl", _mca_ctrl_inputs(examples, **{"steps": 1, **extra}))
    error = json.loads(reply.body)["error"]
    assert reply.status == 400 and message in error
    assert "/tmp" not in error and "vgrt-request-" not in error  # inputs are named, not their server paths


def test_routes_and_verbs(service):
    assert asyncio.run(service.handle("GET", "/methods", {}, b"", "r")).status == 200
    for verb, path, status in [("POST", "/compose/locref", 404), ("GET", "/compose/mca-ctrl", 405), ("GET", "/x", 404)]:
        reply = asyncio.run(service.handle(verb, path, {}, b"", "r"))
        assert reply.status == status and json.loads(reply.body)["request_id"] == "r"


def test_failures_are_500_without_internals_and_the_service_keeps_serving(service, examples, monkeypatch):
    def broken(*args):
        raise RuntimeError("secret detail at /srv/models/unet.onnx")

    monkeypatch.setattr(service, "_run", broken)
    reply = _post(service, "mca-ctrl", _mca_ctrl_inputs(examples, steps=1))
    assert reply.status == 500 and b"/srv" not in reply.body and b"secret" not in reply.body
    assert b"test-id" in reply.body  # the id that finds the traceback in the server log
    monkeypatch.undo()
    assert _post(service, "mca-ctrl", _mca_ctrl_inputs(examples, steps=1)).status == 200


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"preset": "tiny", "colour": 1}, "unknown serve settings 'colour'"),
        ({"methods": "mca-ctrl,paint"}, "unknown method 'paint'"),
        ({"warmup": "later"}, "warmup 'later' is not one of: compose, open"),
        ({"threads": -1}, "threads must be a whole number >= 0, got -1"),
        ({"attention": "native"}, "--attention native is a tensorrt option"),
        (
            {"backend": "onnxruntime", "precision": "bf16"},
            "--precision bf16 does not run on the onnxruntime backend; it runs on: openvino",
        ),
    ],
)
def test_settings_are_refused_before_any_export(settings, message):
    with pytest.raises(InvalidInputError, match=message):
        ServeSettings.from_mapping(settings).check()


@pytest.mark.skipif(not is_available("openvino"), reason="needs openvino")
def test_openvino_serves_merged_calls_on_one_dynamic_model():
    def runner_options(**settings):
        return ServeSettings(preset="tiny", backend="openvino", threads=1, **settings).composer_options()[
            "runner_options"
        ]

    # one request at a time keeps the runner's default (the first call's shapes static); merged calls vary in rows
    assert runner_options(max_batch=1) == {"precision": "fp32", "threads": 1}
    assert runner_options(max_batch=4) == {"precision": "fp32", "threads": 1, "static_shapes": False}


def test_a_published_folder_is_served_under_its_own_preset(tmp_path):
    from vgrt.models.diffusers_folder import write_diffusers_folder
    from vgrt.models.source import ModelSource

    folder = write_diffusers_folder(ModelSource("tiny-sdxl"), tmp_path / "model")
    settings = ServeSettings.from_mapping({"weights": str(folder), "backend": "onnxruntime"})
    settings.check()
    assert settings.source().model_preset().name == "tiny-sdxl"
    assert settings.name == "tiny-sdxl-onnxruntime-fp32"


def test_an_adapter_that_does_not_fit_is_refused_before_any_export(tmp_path):
    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "ip-adapter_sd15.safetensors"  # IP-Adapter's layout, for a 1024-wide context
    save_file({"image_proj.proj.weight": torch.zeros(4 * 1024, 32), "image_proj.proj.bias": torch.zeros(4 * 1024),
               "image_proj.norm.weight": torch.ones(1024), "image_proj.norm.bias": torch.zeros(1024)}, adapter)  # fmt: skip
    settings = ServeSettings.from_mapping({"preset": "tiny", "adapters": str(adapter), "backend": "onnxruntime"})
    with pytest.raises(
        WeightsError, match=r"does not fit the image_proj: wrong shape: .* is \[1024\], the model takes \[32\]"
    ):
        settings.check()


def _cli_args(method, values: dict, out) -> list[str]:
    """`vgrt compose` arguments for the option values `values`."""
    args = ["compose", method.name]
    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            args += ["--" + name.replace("_", "-"), str(item)]
    return [*args, "--out", str(out)]


def _file_bytes(value):
    from pathlib import Path

    return [Path(item).read_bytes() for item in value] if isinstance(value, list) else Path(value).read_bytes()


@pytest.mark.slow  # exports every method's engines (minutes on 2 cores), then one request each
def test_every_method_is_served_as_vgrt_compose_makes_it(examples, tmp_path, composer_cache):
    from pathlib import Path

    from vgrt.models.presets import get_preset
    from vgrt.runtime.methods.registry import METHODS, Examples, Work
    from vgrt.serve.protocol import FILE_INPUTS

    service = ComposeService(
        ServeSettings(backend="onnxruntime", cache=str(composer_cache))
    )  # warm: 2 steps per method
    service.load()
    try:
        for method in METHODS.values():
            benchmark = next(iter(method.benchmarks.values()))
            values = benchmark(Examples(Path(examples), 32, get_preset("tiny")), Work(steps=2, gradient_steps=1))
            values["seed"] = 11
            sent = {name: _file_bytes(value) if name in FILE_INPUTS else value for name, value in values.items()}
            reply = _post(service, method.name, sent)
            out = tmp_path / f"{method.name}.png"
            assert reply.status == 200, reply.body
            assert (
                main([*_cli_args(method, values, out), "--backend", "onnxruntime", "--cache", str(composer_cache)]) == 0
            )
            assert reply.body == out.read_bytes(), method.name
    finally:
        service.close()
