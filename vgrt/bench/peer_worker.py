"""vgrt's side of `vgrt bench peer`: one sample of plain text-to-image in a fresh process.

Like optimum-intel's worker (vgrt.bench.optimum_worker), each sample opens its engines, makes `warmup`
untimed images and then one timed image, so the peers are timed alike and an SD 1.5 engine never shares
memory with another one. Prints one JSON line: the timed image's seconds, its stage seconds and the
process's peak resident memory.

    python -m vgrt.bench.peer_worker FOLDER REQUEST_JSON
"""

import json
import sys

# competitor -> (backend, precision) of vgrt's runners
COMPETITORS = {
    "torch": ("torch", "fp32"),
    "vgrt-onnxruntime": ("onnxruntime", "fp32"),
    "vgrt-openvino": ("openvino", "fp32"),
    "vgrt-openvino-bf16": ("openvino", "bf16"),
}


def runner_options(backend: str, precision: str, threads: int) -> dict:
    from vgrt.engines import thread_settings

    return {**thread_settings(backend, threads), **({"precision": precision} if backend == "openvino" else {})}


def _main(folder: str, request_json: str) -> None:
    import time

    import numpy as np
    import torch

    from vgrt.bench.machine import peak_rss_bytes
    from vgrt.runtime import text_to_image
    from vgrt.runtime.composer import Composer

    request = json.loads(request_json)
    backend, precision = COMPETITORS[request["competitor"]]
    if request["threads"]:
        torch.set_num_threads(request["threads"])
    options = runner_options(backend, precision, request["threads"])
    composer = Composer.from_pretrained(
        folder, preset=request["preset"], backend=backend, cache=request["cache"], progress=False,
        runner_options=options,
    )  # fmt: skip
    job = text_to_image.TextToImageRequest(
        request["prompt"], request["width"], request["height"], steps=request["steps"],
        guidance_scale=request["guidance_scale"], latents=torch.from_numpy(np.load(request["latents"])),
    )  # fmt: skip
    with composer:
        for _ in range(request["warmup"]):
            text_to_image.compose(composer, job)
        started = time.perf_counter()
        composition = text_to_image.compose(composer, job)
        seconds = time.perf_counter() - started
    pixels = ((composition.image[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1)  # as diffusers' output_type="np"
    np.save(request["out"], pixels.numpy())
    print(json.dumps({"seconds": seconds, "stages": composition.times.seconds, "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    _main(*sys.argv[1:])
