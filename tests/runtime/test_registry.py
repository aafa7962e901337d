"""The method registry: each entry builds its request from the example images, as `vgrt compose` and the
bench do, and from a plain mapping as a server would; its declarations match the method modules; the
CLI's subcommands are the registry's methods; an unknown method or input is named."""

import importlib
import subprocess
import sys

import pytest

from vgrt.cli import build_parser
from vgrt.errors import InvalidInputError
from vgrt.models.presets import get_preset
from vgrt.runtime.composer import Composer
from vgrt.runtime.methods.registry import BENCHMARKS, METHODS, Examples, Work, get_method

TINY = get_preset("tiny")
ENCODERS = {"vae_encoder", "vae_decoder", "text_encoder", "image_encoder", "image_proj", "fusion_mlp",
            "appearance_net", "aligner", "layout_adapter", "appearance_adapter"}  # fmt: skip


@pytest.fixture(scope="module")
def example_inputs(examples):
    return Examples(examples, 32, TINY)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_builds_a_request_of_its_method_from_the_examples(example_inputs, name):
    method, values = BENCHMARKS[name]
    request = method.request(values(example_inputs, Work(3)), TINY)
    assert type(request) is method.request_type and request.steps == 3
    assert callable(method.compose) and method.compose.__module__ == f"vgrt.runtime.methods.{method.module}"


def test_every_method_has_a_benchmark_of_its_own_name():
    assert {name: method for name, (method, _) in BENCHMARKS.items() if name in METHODS} == METHODS
    assert set(BENCHMARKS) - set(METHODS) == {"vcf-pno"} and BENCHMARKS["vcf-pno"][0] is METHODS["vcf"]


@pytest.mark.parametrize("name", list(METHODS))
def test_declarations_match_the_method_modules(name):
    method = METHODS[name]
    module = importlib.import_module(f"vgrt.runtime.methods.{method.module}")
    assert method.features == getattr(module, "FEATURES", "none")  # VCF runs the plain UNet, naming none
    assert set(method.components) <= ENCODERS | {"unet"} and len(set(method.components)) == len(method.components)
    assert set(method.components) == set(module.COMPONENTS)
    assert method.request_type.__name__ == method.request_class


def test_the_compose_subcommands_are_the_registry_methods_with_their_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compose", "dreambooth", "--out", "x.png"])
    listed = ", ".join(map(repr, METHODS))  # argparse lists every subcommand, in order
    assert f"invalid choice: 'dreambooth' (choose from {listed})" in capsys.readouterr().err
    for name, method in METHODS.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args(["compose", name, "--help"])
        usage = capsys.readouterr().out
        assert usage.startswith(f"usage: vgrt compose {name} ")
        assert all(option.flag in usage for option in method.options), name


def test_an_unknown_method_is_named_with_the_known_ones():
    message = "unknown method 'dreambooth'; the methods are: mca-ctrl, aicomposer, locref, vcf, visual-prompts"
    with pytest.raises(InvalidInputError, match=message):
        get_method("dreambooth")
    assert get_method("vcf") is METHODS["vcf"]


def test_a_request_from_a_plain_mapping_takes_the_defaults_and_converts_text(examples):
    """What a server sends: file paths and text, no argparse; missing options take their defaults."""
    locref = get_method("locref")
    given = {"prompt": "a ball", "reference": [str(examples / "subject.png")], "box": ["0,0,16,16"], "size": "32x32"}
    request = locref.request({**given, "steps": "4", "guidance": "3.5"}, TINY)
    assert (request.steps, request.guidance_scale, request.seed, request.width) == (4, 3.5, 0, 32)
    assert locref.request(given, TINY).steps == 50  # the CLI's default
    assert get_method("aicomposer").values({"foreground": "f", "foreground_mask": "m", "background": "b",
                                            "box": "0,0,8,8"})["steps"] == 20  # fmt: skip


@pytest.mark.parametrize(
    "given, message",
    [
        ({"reference": ["r.png"], "box": ["0,0,8,8"]}, "--prompt is required: text of the whole image"),
        ({"prompt": "p", "reference": "r.png", "box": ["0,0,8,8"]}, "--reference takes a list (one item per"),
        ({"prompt": "p", "reference": ["r.png"], "box": ["0,0,8,8"], "steps": 2.5}, "--steps 2.5 is not a whole"),
        ({"prompt": "p", "reference": ["r.png"], "box": ["0,0,8,8"], "steps": True}, "--steps True is not a whole"),
        ({"prompt": "p", "reference": ["r.png"], "box": ["0,0,8,8"], "guidance": "x"}, "--guidance 'x' is not a num"),
        ({"prompt": "p", "reference": ["r.png"], "box": ["0,0,8,8"], "mode": "edit"}, "locref takes no input 'mode'"),
    ],
)
def test_a_bad_mapping_is_refused_naming_the_input(given, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        get_method("locref").values(given)


def test_alternatives_take_exactly_one():
    aicomposer = get_method("aicomposer")
    images = {"foreground": "f", "foreground_mask": "m", "background": "b"}
    with pytest.raises(InvalidInputError, match="aicomposer needs exactly one of --placement-mask or --box, got 0$"):
        aicomposer.values(images)
    with pytest.raises(InvalidInputError, match=r"got 2 \(--placement-mask, --box\)"):
        aicomposer.values({**images, "placement_mask": "p", "box": "0,0,8,8"})
    with pytest.raises(InvalidInputError, match="--fusion 'sum' is not one of: concat, blend, xattn"):
        get_method("vcf").values({"prompt": "p", "reference": "r", "fusion": "sum"})


def test_the_registry_and_the_cli_parser_import_no_heavy_module():
    code = (
        "import sys; from vgrt.cli import build_parser; build_parser(); import vgrt.runtime.methods.registry; "
        "print([m for m in ('torch', 'PIL', 'onnxruntime') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", list(METHODS))
def test_a_method_opens_the_unet_and_components_it_declares(example_inputs, composer_cache, name):
    """Run on torch for two steps: the runners it opens are its UNet feature set and its components."""
    method = METHODS[name]
    opened = []

    def record(component, runner):
        opened.append(component)
        return runner

    request = method.request(method.benchmarks[name](example_inputs, Work(2, gradient_steps=1)), TINY)
    with Composer.from_preset("tiny", backend="torch", cache=composer_cache, progress=False,
                              runner_hook=record) as composer:  # fmt: skip
        method.compose(composer, request)
        assert sorted(opened) == sorted(["unet", *method.components])
        composer.runner("unet", method.features)  # already open: the feature set the method ran
    assert sorted(opened) == sorted(["unet", *method.components])
