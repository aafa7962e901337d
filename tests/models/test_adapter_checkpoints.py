"""Adapter checkpoints in their published layouts (vgrt.models.adapter_checkpoints), on tiny models.

The files are written here with the published key names from random weights: IP-Adapter's indexing of its
per-layer projections is rebuilt the way its own loader reads them (`ModuleList(unet.attn_processors.values())`)
and checked against diffusers' IP-Adapter implementation, so a wrong mapping in vgrt shows.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.runtime.methods.inputs import box_mask, random_image
from vgrt.cli import main
from vgrt.errors import WeightsError
from vgrt.export.cache import cache_key
from vgrt.export.components import build_component
from vgrt.export.exporter import ExportSettings
from vgrt.models.adapter_checkpoints import adapter_files, check_source_adapters, reads_adapters
from vgrt.models.presets import get_preset
from vgrt.models.source import ModelSource
from vgrt.models.unet import build_unet
from vgrt.runtime.composer import Composer
from vgrt.runtime.methods import aicomposer

EXTRA = frozenset({"extra_tokens"})


def _random_like(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in state.items()}


def ip_adapter_state(preset: str, seed: int = 7, source: ModelSource | None = None) -> dict[str, dict]:
    """IP-Adapter's state dict as its .bin holds it: {'image_proj': ..., 'ip_adapter': {'<i>.to_k_ip.weight': ...}},
    i indexing the UNet's attention processors. Random weights, or those of `source` when given."""
    weights = source or ModelSource(preset)
    image_proj = build_component("image_proj", weights, frozenset(), "float32").module.state_dict()
    unet = build_unet(weights, EXTRA).unet
    ip_adapter = {
        f"{i}.{name.replace('_extra', '_ip')}": tensor
        for i, processor in enumerate(unet.attn_processors.values())
        for name, tensor in processor.state_dict().items()
    }
    if source is None:
        image_proj, ip_adapter = _random_like(image_proj, seed), _random_like(ip_adapter, seed + 1)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_ip_adapter(folder, state: dict[str, dict], suffix: str = ".safetensors", name: str = "ip-adapter_sd15"):
    """The checkpoint as released: flat prefixed keys in safetensors, nested dicts in the pickled .bin."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file({f"{part}.{k}": v.contiguous() for part, sub in state.items() for k, v in sub.items()}, path)
    else:
        torch.save(state, path)
    return path


def write_image_encoder(folder, source: ModelSource) -> None:
    """The image_encoder/ folder published beside IP-Adapter: a transformers CLIPVisionModelWithProjection."""
    encoder = build_component("image_encoder", source, frozenset(), "float32").module.model
    encoder.save_pretrained(folder / "image_encoder")


def test_ip_adapter_loads_unchanged_into_image_proj_and_the_unet_layers(tmp_path):
    state = ip_adapter_state("tiny")
    source = ModelSource("tiny", adapters=(str(write_ip_adapter(tmp_path, state)),))
    proj = build_component("image_proj", source, frozenset(), "float32").module
    for key, tensor in state["image_proj"].items():
        assert torch.equal(proj.state_dict()[key], tensor), key
    processors = list(build_unet(source, EXTRA).unet.attn_processors.values())
    assert len(state["ip_adapter"]) == 2 * 7  # k and v of tiny's 7 cross-attention layers, indices 1, 3, ..., 13
    for key, tensor in state["ip_adapter"].items():
        index, name = key.split(".", 1)
        assert torch.equal(processors[int(index)].state_dict()[name.replace("_ip", "_extra")], tensor), key


def test_the_unet_without_image_tokens_ignores_the_adapter(tmp_path):
    source = ModelSource("tiny", adapters=(str(write_ip_adapter(tmp_path, ip_adapter_state("tiny"))),))
    plain = build_unet(source, frozenset()).state_dict()
    assert all(torch.equal(plain[k], v) for k, v in build_unet(ModelSource("tiny"), frozenset()).state_dict().items())
    assert not reads_adapters("unet", "none") and reads_adapters("unet", "extra_tokens,regions")


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-sdxl"])
def test_ip_adapter_gives_what_diffusers_ip_adapter_gives(tmp_path, preset_name):
    """The same file loaded by diffusers' IP-Adapter loader and by vgrt: the same noise prediction."""
    from diffusers import UNet2DConditionModel

    preset = get_preset(preset_name)
    state = ip_adapter_state(preset_name)
    source = ModelSource(preset_name, adapters=(str(write_ip_adapter(tmp_path, state)),))
    ours = build_unet(source, EXTRA)
    reference = UNet2DConditionModel(**preset.unet)
    reference.load_state_dict({k: v for k, v in ours.unet.state_dict().items() if ".processor." not in k})
    reference._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    g = torch.Generator().manual_seed(3)
    sample, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500.0, 500.0])
    text = torch.randn(2, 7, preset.context_dim, generator=g)
    embeds = torch.randn(2, preset.image_encoder["projection_dim"], generator=g)
    added = {}
    if preset.is_sdxl:
        pooled = preset.unet["projection_class_embeddings_input_dim"] - 6 * preset.unet["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.rand(2, 6, generator=g) * 64}
    with torch.no_grad():
        expected = reference(sample, t, text, added_cond_kwargs={**added, "image_embeds": [embeds[:, None]]}).sample
        tokens = build_component("image_proj", source, frozenset(), "float32").module(embeds)
        gates = torch.ones(ours.num_blocks, 2)
        got = ours(
            sample, t, text, **added, extra_tokens=tokens, extra_gate=torch.ones(2, 1, 16, 16), layer_gates=gates
        )
        without = ours(
            sample, t, text, **added, extra_tokens=tokens, extra_gate=torch.zeros(2, 1, 16, 16), layer_gates=gates
        )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (without - expected).abs().max() > 1e-3  # the image tokens matter: the check above can fail


def test_the_pickled_release_loads_only_with_allow_pickle(tmp_path):
    state = ip_adapter_state("tiny")
    path = write_ip_adapter(tmp_path / "bin", state, ".bin")
    with pytest.raises(WeightsError, match=r"ip-adapter_sd15\.bin' is a pickled checkpoint.*--allow-pickle"):
        build_component("image_proj", ModelSource("tiny", adapters=(str(path),)), frozenset(), "float32")
    pickled = ModelSource("tiny", allow_pickle=True, adapters=(str(path),))
    safe = ModelSource("tiny", adapters=(str(write_ip_adapter(tmp_path / "st", state)),))
    for source_a, source_b in ((pickled, safe),):
        a, b = build_unet(source_a, EXTRA).state_dict(), build_unet(source_b, EXTRA).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_prefers_the_safetensors_twin_and_supplies_its_image_encoder(tmp_path):
    state = ip_adapter_state("tiny")
    write_ip_adapter(tmp_path, state, ".bin")  # read only with allow_pickle: a folder with a twin skips it
    write_ip_adapter(tmp_path, state)
    encoder_source = ModelSource("tiny", seed=5)
    write_image_encoder(tmp_path, encoder_source)
    source = ModelSource("tiny", adapters=(str(tmp_path),))
    got = build_component("image_encoder", source, frozenset(), "float32").module.state_dict()
    want = build_component("image_encoder", encoder_source, frozenset(), "float32").module.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    other = build_component("image_encoder", ModelSource("tiny"), frozenset(), "float32").module.state_dict()
    assert not all(torch.equal(got[k], other[k]) for k in want)


def test_one_folder_holds_a_method_s_checkpoints_and_refuses_two_of_one_kind(tmp_path):
    ip_adapter, mlp = write_aicomposer_release(tmp_path, ModelSource("tiny"))
    folder = Path(ip_adapter).parent
    Path(mlp).rename(folder / "mlp_sdxl.pth")  # beside IP-Adapter's image_encoder/, which both then share
    found = adapter_files((str(folder),), allow_pickle=True)
    assert sorted(c for a in found for c in a.components) == [
        "fusion_mlp",
        "image_encoder",
        "image_encoder",
        "image_proj",
        "unet",
    ]
    write_ip_adapter(folder, ip_adapter_state("tiny"), name="ip-adapter_sd15")
    with pytest.raises(WeightsError, match=r"two adapters supply the image_proj: '.*ip-adapter_sd15\.safetensors' and "
                       r"'.*ip-adapter_sdxl\.safetensors'; give one of them"):  # fmt: skip
        adapter_files((str(folder),), allow_pickle=True)


@pytest.mark.parametrize(
    ("component", "file", "keys"),
    [
        ("fusion_mlp", "mlp_sdxl.pth", lambda s: s),  # AIComposer: MLPCLIPFeatureNetwork's state dict
        ("aligner", "model.pth", lambda s: s),  # VCF: torch.save(aligner.state_dict(), 'model.pth')
        ("aligner", "aligner.safetensors", lambda s: s),
        ("appearance_net", "locref.safetensors", lambda s: {f"appearance_net.{k}": v for k, v in s.items()}),
        ("appearance_adapter", "vp.safetensors", lambda s: {f"appearance_adapter.{k}": v for k, v in s.items()}),
    ],
)
def test_single_adapter_layouts_load_unchanged(tmp_path, component, file, keys):
    state = _random_like(build_component(component, ModelSource("tiny"), frozenset(), "float32").module.state_dict(), 9)
    path = tmp_path / file
    save_file(keys(state), path) if path.suffix == ".safetensors" else torch.save(keys(state), path)
    source = ModelSource("tiny", allow_pickle=True, adapters=(str(path),))
    loaded = build_component(component, source, frozenset(), "float32").module.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_misnamed_and_mismatched_files_are_named_with_the_layout(tmp_path):
    with pytest.raises(WeightsError, match=r"adapter path '.*nothing\.safetensors' does not exist"):
        check_source_adapters(
            ModelSource("tiny", adapters=(str(tmp_path / "nothing.safetensors"),)), get_preset("tiny")
        )

    save_file({"weight": torch.zeros(2)}, tmp_path / "odd.safetensors")
    with pytest.raises(WeightsError, match=r"odd\.safetensors' is in no adapter layout .*\(its keys: weight\); "
                       r"expected: IP-Adapter: image_proj\.proj\.weight"):  # fmt: skip
        build_component(
            "image_proj", ModelSource("tiny", adapters=(str(tmp_path / "odd.safetensors"),)), frozenset(), "float32"
        )

    state = ip_adapter_state("tiny")
    state["ip_adapter"]["3.to_k.weight"] = state["ip_adapter"].pop("3.to_k_ip.weight")
    misnamed = ModelSource("tiny", adapters=(str(write_ip_adapter(tmp_path / "misnamed", state)),))
    message = (
        r"ip-adapter_sd15\.safetensors' \(IP-Adapter\) does not fit the unet: missing: ip_adapter\.3\.to_k_ip\.weight "
        r"\(1\); unexpected: ip_adapter\.3\.to_k\.weight \(1\); expected keys: image_proj\.proj\.weight"
    )
    with pytest.raises(WeightsError, match=message):
        check_source_adapters(misnamed, get_preset("tiny"))
    with pytest.raises(WeightsError, match=message):
        build_unet(misnamed, EXTRA)


def _ip_file(tmp_path, tokens: int, context: int, embed: int):
    g = torch.Generator().manual_seed(0)
    state = ip_adapter_state("tiny")
    state["image_proj"] = {
        "proj.weight": torch.randn(tokens * context, embed, generator=g), "proj.bias": torch.zeros(tokens * context),
        "norm.weight": torch.ones(context), "norm.bias": torch.zeros(context),
    }  # fmt: skip
    return write_ip_adapter(tmp_path / f"{tokens}-{context}-{embed}", state)


@pytest.mark.parametrize(
    ("tokens", "context", "embed", "message"),
    [
        (4, 64, 32, ("the file is made for context width 64, image tokens 4, image embed width 32; the base model "
                     "takes context width 32; give the adapter released for this base model")),
        (16, 32, 32, "made for context width 32, image tokens 16, image embed width 32; the base model takes image tokens 4"),
        (4, 32, 48, "image embed width 48; the base model takes image embed width 32"),
    ],
)  # fmt: skip
def test_an_adapter_for_another_model_is_refused_naming_the_widths(tmp_path, tokens, context, embed, message):
    source = ModelSource("tiny", adapters=(str(_ip_file(tmp_path, tokens, context, embed)),))
    with pytest.raises(WeightsError, match=r"ip-adapter_sd15\.safetensors' \(IP-Adapter\) does not fit the base model"):
        check_source_adapters(source, get_preset("tiny"))
    with pytest.raises(WeightsError) as raised:
        check_source_adapters(source, get_preset("tiny"))
    assert message in str(raised.value)


def test_layers_of_another_unet_are_refused_naming_the_shapes(tmp_path):
    state = ip_adapter_state("tiny")
    state["ip_adapter"]["1.to_v_ip.weight"] = torch.zeros(48, 32)
    source = ModelSource("tiny", adapters=(str(write_ip_adapter(tmp_path, state)),))
    with pytest.raises(
        WeightsError, match=r"wrong shape: ip_adapter\.1\.to_v_ip\.weight is \[48, 32\], the model takes \[32, 32\]"
    ):
        check_source_adapters(source, get_preset("tiny"))


def test_compose_refuses_an_adapter_that_does_not_fit_before_any_work(examples, tmp_path, capsys, no_work):
    path = _ip_file(tmp_path, 4, 64, 32)
    args = ["compose", "aicomposer", "--foreground", str(examples / "subject.png"),
            "--foreground-mask", str(examples / "subject_mask.png"), "--background", str(examples / "scene.png"),
            "--box", "4,4,20,20", "--adapter", str(path), "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit the base model: the file is made for context width 64" in err and str(path) in err
    assert not (tmp_path / "out.png").exists()


def test_the_cache_key_covers_the_adapter_files(tmp_path):
    first = write_ip_adapter(tmp_path / "a", ip_adapter_state("tiny", seed=1))
    second = write_ip_adapter(tmp_path / "b", ip_adapter_state("tiny", seed=2))
    settings = ExportSettings(components="image_proj")
    keys = {cache_key(ExportSettings(components="image_proj", adapters=(str(p),))) for p in (first, second)}
    assert len(keys | {cache_key(settings)}) == 3
    before = cache_key(ExportSettings(components="image_proj", adapters=(str(first),)))
    write_image_encoder(tmp_path / "a", ModelSource("tiny"))  # published beside the file: read with it
    assert cache_key(ExportSettings(components="image_proj", adapters=(str(first),))) != before


def write_aicomposer_release(folder, source: ModelSource) -> tuple[str, str]:
    """AIComposer's downloads (IP-Adapter with its image encoder, and the fusion MLP) holding `source`'s weights."""
    ip_path = write_ip_adapter(folder / "IP-Adapter", ip_adapter_state("tiny", source=source), name="ip-adapter_sdxl")
    write_image_encoder(folder / "IP-Adapter", source)
    mlp = build_component("fusion_mlp", source, frozenset(), "float32").module.state_dict()
    (folder / "mlp_model").mkdir()
    torch.save(mlp, folder / "mlp_model" / "mlp_sdxl.pth")
    return str(ip_path), str(folder / "mlp_model" / "mlp_sdxl.pth")


def test_exports_that_read_adapters_are_keyed_by_them_and_the_others_shared(monkeypatch, tmp_path):
    from vgrt.engines.engine_set import ExportCache

    asked = []
    monkeypatch.setattr("vgrt.export.cache.cached_export", lambda settings, root: asked.append(settings))
    adapters = write_aicomposer_release(tmp_path, ModelSource("tiny"))
    cache = ExportCache(ModelSource("tiny", allow_pickle=True, adapters=adapters))
    wanted = [
        ("unet", "extra_tokens"),
        ("image_encoder", "none"),
        ("fusion_mlp", "none"),
        ("unet", "none"),
        ("vae_decoder", "none"),
    ]
    for component, features in wanted:
        cache.export(component, features)
    assert [s.adapters for s in asked] == [adapters, adapters, adapters, (), ()]


# onnxruntime exports the adapter's own image encoder, projection, MLP and UNet: about a minute on a busy machine
@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=pytest.mark.slow)])
def test_aicomposer_from_published_checkpoints_matches_the_preset_path(tmp_path, composers, composer_cache, backend):
    """The preset's own adapter weights, written in the published layouts and loaded from there, give the
    preset's image: every key lands where the preset path puts it, on the engines too (whose exports record
    the adapters they read)."""
    request = aicomposer.AIComposerRequest(
        random_image(1), box_mask(4, 28, 6, 26), random_image(2), box_mask(8, 24, 4, 20),
        steps=4, inversion_steps=2, image_token_end=3, adain_end=2, prompt="a red cube",
    )  # fmt: skip
    expected = aicomposer.compose(composers(backend), request).latents
    source = ModelSource("tiny", allow_pickle=True, adapters=write_aicomposer_release(tmp_path, ModelSource("tiny")))
    with Composer(source, backend, cache=composer_cache, progress=False) as composer:
        got = aicomposer.compose(composer, request).latents
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if backend != "torch":
        recorded = [json.loads(m.read_text())["source"].get("adapters") for m in composer_cache.glob("*/manifest.json")]
        assert recorded.count(list(source.adapters)) == 4  # image_encoder, image_proj, fusion_mlp, unet (extra_tokens)


def _aicomposer_args(examples, out, *extra):
    return ["compose", "aicomposer", "--foreground", str(examples / "subject.png"),
            "--foreground-mask", str(examples / "subject_mask.png"), "--background", str(examples / "scene.png"),
            "--box", "4,4,20,20", "--steps", "3", "--backend", "torch", "--out", str(out), *extra]  # fmt: skip


def test_compose_takes_the_published_files(examples, tmp_path, composer_cache):
    from PIL import Image

    ip_adapter, mlp = write_aicomposer_release(tmp_path, ModelSource("tiny", seed=3))
    extra = (
        "--adapter",
        str(Path(ip_adapter).parent),
        "--adapter",
        mlp,
        "--allow-pickle",
        "--cache",
        str(composer_cache),
    )
    assert main(_aicomposer_args(examples, tmp_path / "out.png", *extra)) == 0
    recorded = Image.open(tmp_path / "out.png").text["vgrt.adapters"]
    assert recorded == f"{Path(ip_adapter).parent.resolve()}, {Path(mlp).resolve()}"


def test_compose_refuses_a_pickled_adapter_without_allow_pickle_before_any_work(examples, tmp_path, capsys, no_work):
    _, mlp = write_aicomposer_release(tmp_path, ModelSource("tiny"))
    assert main(_aicomposer_args(examples, tmp_path / "out.png", "--adapter", mlp)) == 2
    err = capsys.readouterr().err
    assert f"{mlp!r} is a pickled checkpoint" in err and "--allow-pickle" in err
    assert not (tmp_path / "out.png").exists()
