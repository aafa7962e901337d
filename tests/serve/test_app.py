"""The Ray Serve application object (built, not started) and the missing-extra error without Ray."""

import importlib.util
import sys

import pytest

from vgrt.errors import InvalidInputError, MissingDependencyError
from vgrt.serve.app import app_builder, build_app
from vgrt.serve.service import ServeSettings

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray[serve]")


@needs_ray
def test_config_args_become_one_named_deployment_with_its_scaling():
    args = {"preset": "tiny", "backend": "onnxruntime", "methods": ["vcf"], "replicas": 2, "num_cpus": 0.5}
    app = app_builder({**args, "max_queued_requests": 4})
    deployment = app._bound_deployment  # Ray keeps the deployment of a bound application here
    assert deployment.name == "tiny-onnxruntime-fp32" and deployment.num_replicas == 2
    assert deployment.max_queued_requests == 4 and deployment.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0}


@needs_ray
@pytest.mark.parametrize(
    "args, message",
    [
        ({"replicas": 0}, "replicas must be a whole number >= 1, got 0"),
        ({"replicas": 3, "max_replicas": 2}, "max_replicas 2 is below replicas 3"),
        ({"max_batch": 4}, "max_batch 4 is above max_ongoing_requests 2: a replica holds at most"),
        ({"preset": "huge"}, "huge"),
        (
            {"backend": "onnxruntime", "precision": "bf16"},
            "--precision bf16 does not run on the onnxruntime backend; it runs on: openvino",
        ),
    ],
)
def test_bad_config_args_are_refused_before_ray_starts(args, message):
    with pytest.raises(InvalidInputError, match=message):
        app_builder(args)


def test_without_ray_the_error_names_the_serve_extra(monkeypatch):
    for module in ("ray", "ray.serve"):  # importing them fails as if Ray were not installed
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'vgrt\[serve\]'"):
        build_app(ServeSettings())


@needs_ray
def test_vgrt_serve_max_batch_raises_max_ongoing_or_is_refused_below_it(monkeypatch, capsys):
    from vgrt.cli import main

    built = {}

    def stop_before_ray(settings, scaling):  # what `vgrt serve` would build; Ray is never started
        built.update(settings=settings, scaling=scaling)
        raise InvalidInputError("stopped before Ray")

    monkeypatch.setattr("vgrt.serve.app.build_app", stop_before_ray)
    assert main(["serve", "--max-batch", "4", "--batch-wait-ms", "25"]) == 2
    assert built["settings"].max_batch == 4 and built["settings"].batch_wait_ms == 25
    assert built["scaling"].max_ongoing_requests == 4  # --max-ongoing defaults to the batch size
    monkeypatch.undo()  # the real build_app refuses the pair before Ray starts
    assert main(["serve", "--max-batch", "4", "--max-ongoing", "2"]) == 2
    assert "max_batch 4 is above max_ongoing_requests 2" in capsys.readouterr().err


@needs_ray
def test_vgrt_serve_metrics_port_is_refused_for_a_cluster_it_joins(capsys):
    from vgrt.cli import main

    assert main(["serve", "--metrics-port", "9100", "--address", "auto"]) == 2
    assert "give it to that node's `ray start --metrics-export-port`" in capsys.readouterr().err
