"""The loops drive a UNet with conditioning features: guidance halves stacked with their row wiring, gates set per step."""

import torch

from vgrt.engines import open_runner
from vgrt.export.feeds import random_feed
from vgrt.export.manifest import read_manifest
from vgrt.runtime.conditioning import LOOP_INPUTS, Conditioning
from vgrt.runtime.sampling import SamplingSettings, denoise, random_latents
from vgrt.runtime.schedulers import build_scheduler

from .helpers import LATENT, ROWS, TOKENS, RecordingRunner, relative_error


def test_guided_sampling_with_mutual_attention_and_per_step_gates_agrees_across_backends(tiny_export):
    directory = tiny_export(features="mutual")  # rows wired across the batch, gated per block
    spec = read_manifest(directory).component("unet").spec
    sizes = {**spec.profile_sizes("opt"), "batch": ROWS, "height": LATENT, "width": LATENT, "context": TOKENS}
    cond = {k: v for k, v in random_feed(spec, sizes, seed=7).items() if k not in LOOP_INPUTS}
    conditioning = Conditioning(cond, {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])})
    gates = [torch.zeros_like(cond["layer_gates"]), torch.ones_like(cond["layer_gates"])]

    def before_step(i, t, latents, feed):
        feed["layer_gates"].copy_(gates[i % 2])  # features off on even steps, on on odd ones

    finals = {}
    for backend in ("torch", "onnxruntime"):
        with open_runner(directory, backend=backend) as runner:
            recording = RecordingRunner(runner)
            latents = random_latents((ROWS, 4, LATENT, LATENT), torch.Generator().manual_seed(0))
            settings = SamplingSettings(steps=4, guidance_scale=4.0, progress=False)
            finals[backend] = denoise(
                recording, build_scheduler("ddim"), latents, conditioning, settings, before_step=before_step
            )
        assert len(recording.feeds) == 4
        assert all(torch.equal(feed["layer_gates"], gates[i % 2]) for i, feed in enumerate(recording.feeds))
        listed = cond["mutual_rows"]  # both guidance halves' listed rows, each half wired to itself
        assert recording.feeds[0]["mutual_rows"].tolist() == torch.cat([listed, listed + ROWS]).tolist()
        assert recording.feeds[0]["kv_index"].shape[-1] == 2 * len(listed)
    assert relative_error(finals["onnxruntime"], finals["torch"]) <= 1e-4
