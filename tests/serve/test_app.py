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
