"""Bad input fails before any work, with a VgrtError naming the input, the value seen and the one expected."""

import pytest
import torch

from vgrt.errors import ArtifactError, InvalidInputError, VgrtError
from vgrt.export.feeds import random_feed
from vgrt.export.spec import unet_spec
from vgrt.models.features import FEATURES
from vgrt.models.presets import get_preset


@pytest.fixture(scope="module")
def spec():
    return unet_spec(get_preset("tiny"), frozenset(FEATURES), "float32", num_blocks=7)


@pytest.fixture
def feed(spec):
    return random_feed(spec, seed=0)


def test_valid_feed_resolves_dims(spec, feed):
    assert spec.validate(feed) == spec.profile_sizes("opt") | {"groups": 2, "regions": 2}


@pytest.mark.parametrize(
    "change, pattern",
    [
        (
            lambda f: f.update(region_masks=torch.zeros(2, 2, 16, 8)),
            r"'region_masks' has width=8 at axis 3, but 'sample' has width=16",
        ),
        (
            lambda f: f.update(token_regions=torch.zeros(2, 3, 4)),
            r"'token_regions' has regions=3 .* 'region_masks' has regions=2",
        ),
        (
            lambda f: f.update(sample=torch.zeros(2, 4, 15, 16)),
            r"height=15, which is not a multiple of 2 .* use 14 or 16",
        ),
        (
            lambda f: f.update(encoder_hidden_states=torch.zeros(2, 400, 32)),
            r"context=400, outside the exported profile \[1, 334\]",
        ),
        (
            lambda f: f.update(extra_gate=torch.zeros(2, 16, 16)),
            r"'extra_gate' has shape \(2, 16, 16\), expected 4 axes",
        ),
        (lambda f: f.update(encoder_hidden_states=torch.zeros(2, 77, 64)), r"size 64 at axis 2, expected 32"),
        (
            lambda f: f.update(sample=torch.zeros(2, 4, 16, 16, dtype=torch.float16)),
            r"'sample' has dtype float16, expected float32",
        ),
        (
            lambda f: f.update(kv_index=torch.full((2, 1), 5)),
            r"'kv_index' has values in \[5, 5\], expected values in \[0, 1\]",
        ),
        (
            lambda f: f.update(mutual_rows=torch.tensor([2])),
            r"'mutual_rows' has values in \[2, 2\], expected values in \[0, 1\]",
        ),
        (
            lambda f: f.update(q_index=torch.zeros(2, 2, dtype=torch.int64)),
            r"'q_index' has mutual_rows=2 at axis 1, but 'mutual_rows' has mutual_rows=1",
        ),
        (lambda f: f.update(extra_gate=torch.full((2, 1, 16, 16), 2.0)), r"'extra_gate' has values in \[2.0, 2.0\]"),
        (lambda f: f.pop("layer_gates"), r"missing \['layer_gates'\]"),
        (lambda f: f.update(colour=torch.zeros(1)), r"unexpected \['colour'\]"),
    ],
)
def test_bad_feed_is_named(spec, feed, change, pattern):
    change(feed)
    with pytest.raises(InvalidInputError, match=pattern):
        spec.validate(feed)


def test_runner_checks_the_feed_before_running(tiny_export):
    from vgrt.engines import open_runner
    from vgrt.export import example_feed

    directory = tiny_export(features="none")
    feed = example_feed(directory)
    feed["sample"] = feed["sample"][:, :, :15]
    with (
        open_runner(directory, backend="onnxruntime") as runner,
        pytest.raises(InvalidInputError, match="multiple of 2"),
    ):
        runner.infer(feed)
    with pytest.raises(VgrtError, match="not active"):
        open_runner(directory, backend="onnxruntime").infer(example_feed(directory))


def test_open_runner_rejects_bad_directory_and_backend(tmp_path, tiny_export):
    from vgrt.engines import open_runner

    with pytest.raises(ArtifactError, match="not a complete vgrt export"):
        open_runner(tmp_path, backend="onnxruntime")
    with pytest.raises(InvalidInputError, match="unknown backend 'tensorflow'.*torch, onnxruntime"):
        open_runner(tiny_export(features="none"), backend="tensorflow")
    with pytest.raises(ArtifactError, match="no component 'vae'"):
        open_runner(tiny_export(features="none"), component="vae")


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_random_feeds_list_distinct_rows_in_range(spec, rows):
    sizes = {**spec.profile_sizes("opt"), "batch": 6, "mutual_rows": rows}
    feed = random_feed(spec, sizes, seed=rows)
    listed = feed["mutual_rows"].tolist()
    assert len(set(listed)) == rows and all(0 <= row < 6 for row in listed)
    assert spec.validate(feed)["mutual_rows"] == rows


def test_random_feed_refuses_more_listed_rows_than_rows(spec):
    with pytest.raises(InvalidInputError, match="mutual_rows lists 3 distinct rows of 2"):
        random_feed(spec, {**spec.profile_sizes("opt"), "batch": 2, "mutual_rows": 3})
