"""The KubeRay RayService manifest and the Dockerfile in deploy/: their structure, and that the serve
config they carry is one vgrt.serve.app:app_builder accepts (settings checked without Ray)."""

import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from vgrt.serve.app import Scaling
from vgrt.serve.service import ServeSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())


@pytest.fixture(scope="module")
def serve_config(manifest) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def _containers(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def test_rayservice_has_a_cpu_head_and_one_gpu_per_worker(manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cluster["enableInTreeAutoscaling"] is True and len(cluster["workerGroupSpecs"]) >= 1
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and group["rayStartParams"]["num-gpus"] == "1"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        engines = next(mount for mount in container["volumeMounts"] if mount["mountPath"] == "/engines")
        assert engines["subPath"]  # engines are built per GPU type, each group in its own folder
    subpaths = [
        g["template"]["spec"]["containers"][0]["volumeMounts"][0]["subPath"] for g in cluster["workerGroupSpecs"]
    ]
    assert len(set(subpaths)) == len(subpaths)


def test_every_container_has_ray_token_authentication_on(manifest):
    for container in _containers(manifest):
        env = {item["name"]: item for item in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "vgrt-ray-token"


def test_serve_config_binds_explicitly_and_builds_vgrt_apps(serve_config):
    assert serve_config["http_options"]["host"] and serve_config["http_options"]["port"] == 8000
    for app in serve_config["applications"]:
        assert app["import_path"] == "vgrt.serve.app:app_builder"
        args = dict(app["args"])
        assert args["num_gpus"] == 1 and args["backend"] == "tensorrt" and args["cache"] == "/engines"
        scaling_names = {field.name for field in fields(Scaling)}
        scaling = Scaling(**{k: v for k, v in args.items() if k in scaling_names})
        scaling.check()
        assert "autoscaling_config" in scaling.deployment_options()
        settings = ServeSettings.from_mapping({k: v for k, v in args.items() if k not in scaling_names})
        assert settings.name == "sd15-tensorrt-fp16"  # the deployment name config overrides refer to


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray[serve] for its config schema")
def test_serve_config_is_valid_for_ray_serve(serve_config):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)


def test_dockerfile_installs_the_serving_and_gpu_extras():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:") and "cudnn" in lines[0]
    assert any(line.startswith("RUN pip install") and "[trt,serve]" in line for line in lines)
    assert "RAY_AUTH_MODE=token" in text and "USER ray" in lines and "EXPOSE 8000" in lines
    assert lines[-1].startswith('CMD ["vgrt", "serve", "--host", "0.0.0.0"')
