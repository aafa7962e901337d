"""optimum-intel's side of `vgrt bench peer`, run by the peer environment's Python (vgrt.bench.peer_env).

vgrt is not installed in that environment, so this file imports only the peer's own packages. Each
command prints one JSON line.

    python optimum_worker.py convert FOLDER IR_FOLDER
        the diffusers FOLDER converted to OpenVINO IR once (not timed, not repeated per sample)
    python optimum_worker.py run IR_FOLDER REQUEST_JSON
        one sample: load and compile, `warmup` untimed images, then one timed image, written to `out`
"""

import json
import resource
import sys
import time

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def convert(folder: str, ir_folder: str) -> dict:
    from optimum.intel import OVStableDiffusionPipeline

    started = time.perf_counter()
    OVStableDiffusionPipeline.from_pretrained(folder, export=True, compile=False).save_pretrained(ir_folder)
    return {"seconds": time.perf_counter() - started}


def run(ir_folder: str, request: dict) -> dict:
    import numpy as np
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[request["precision"]]}
    if request["threads"]:
        config["INFERENCE_NUM_THREADS"] = request["threads"]
    torch.set_num_threads(request["threads"] or torch.get_num_threads())
    latents = torch.from_numpy(np.load(request["latents"]))
    pipe = OVStableDiffusionPipeline.from_pretrained(ir_folder, compile=False, ov_config=config)
    pipe.reshape(batch_size=1, height=request["height"], width=request["width"], num_images_per_prompt=1)
    pipe.compile()

    def image() -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        out = pipe(
            request["prompt"], num_inference_steps=request["steps"], guidance_scale=request["guidance_scale"],
            latents=latents.clone(), output_type="np",
        )  # fmt: skip
        return time.perf_counter() - started, out.images[0]

    for _ in range(request["warmup"]):
        image()
    seconds, pixels = image()
    np.save(request["out"], pixels)  # [H, W, 3] in [0, 1]
    return {"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


if __name__ == "__main__":
    # No usage events from a process vgrt starts: openvino, optimum-intel and NNCF fall back to their no-op
    # telemetry when the package does not import (as vgrt._lazy imports openvino).
    sys.modules["openvino_telemetry"] = None
    command, *args = sys.argv[1:]
    result = convert(*args) if command == "convert" else run(args[0], json.loads(args[1]))
    print(json.dumps(result))
