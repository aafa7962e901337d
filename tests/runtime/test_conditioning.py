"""Conditioning halves are cast once and stacked into one batch, row wiring intact."""

import pytest
import torch

from vgrt.errors import InvalidInputError
from vgrt.export.spec import ComponentSpec, TensorSpec, unet_spec
from vgrt.models.presets import Range, get_preset
from vgrt.runtime.conditioning import Conditioning, unet_inputs

SPEC = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec("sample", "float16", ("batch", 4, "height", "width")),
        TensorSpec("timestep", "float16", ("batch",)),
        TensorSpec("encoder_hidden_states", "float16", ("batch", "context", 8)),
        TensorSpec("kv_index", "int64", ("groups", "batch"), index_of="batch"),
        TensorSpec("layer_gates", "float16", (3, 2)),
    ),
    outputs=(TensorSpec("noise_pred", "float16", ("batch", 4, "height", "width")),),
    dims={
        "batch": Range(1, 2, 8),
        "height": Range(8, 8, 8),
        "width": Range(8, 8, 8),
        "context": Range(1, 5, 9),
        "groups": Range(1, 2, 2),
    },
)
ROWS = 3
COND = {
    "encoder_hidden_states": torch.ones(ROWS, 5, 8),
    "kv_index": torch.tensor([[0, 1, 2], [2, 2, 0]], dtype=torch.int32),
    "layer_gates": torch.ones(3, 2, dtype=torch.bool),
}


def inputs(conditioning: Conditioning, guided: bool) -> dict[str, torch.Tensor]:
    return unet_inputs(SPEC, conditioning, ROWS, guided, torch.device("cpu"))


def test_without_guidance_the_inputs_are_only_cast_to_the_spec():
    got = inputs(Conditioning(COND, {"encoder_hidden_states": torch.zeros(ROWS, 5, 8)}), guided=False)
    assert {k: v.dtype for k, v in got.items()} == {
        "encoder_hidden_states": torch.float16, "kv_index": torch.int64, "layer_gates": torch.float16,
    }  # fmt: skip
    assert torch.equal(got["kv_index"], COND["kv_index"].long())
    assert got["encoder_hidden_states"].shape == (ROWS, 5, 8)


@pytest.mark.parametrize("guided", [False, True])
def test_the_feed_owns_its_tensors_so_hook_edits_stay_in_the_run(guided):
    ready = {
        "encoder_hidden_states": torch.ones(ROWS, 5, 8, dtype=torch.float16),
        "layer_gates": torch.ones(3, 2, dtype=torch.float16),
    }
    got = inputs(Conditioning(ready, {"encoder_hidden_states": torch.zeros(ROWS, 5, 8)}), guided)
    for value in got.values():
        value.zero_()
    assert all((value == 1).all() for value in ready.values())


def test_guided_halves_stack_uncond_first_and_shift_row_indices_of_the_cond_half():
    got = inputs(Conditioning(COND, {"encoder_hidden_states": torch.zeros(ROWS, 5, 8)}), guided=True)
    ehs = got["encoder_hidden_states"]
    assert ehs.shape == (2 * ROWS, 5, 8) and (ehs[:ROWS] == 0).all() and (ehs[ROWS:] == 1).all()
    # The uncond half re-uses cond's wiring (it gave none), each half pointing into itself.
    assert got["kv_index"].tolist() == [[0, 1, 2, 3, 4, 5], [2, 2, 0, 5, 5, 3]]
    assert got["layer_gates"].shape == (3, 2)  # no batch axis: shared by both halves


@pytest.mark.parametrize(
    ("conditioning", "message"),
    [
        (Conditioning(COND), "guidance_scale > 1 needs the unconditional inputs"),
        (
            Conditioning({**COND, "sample": torch.zeros(1)}, {"kv_index": COND["kv_index"]}),
            r"inputs \['sample'\] the UNet does not take",
        ),
        (Conditioning(COND, {"text": torch.zeros(1)}), r"Conditioning.uncond has inputs \['text'\]"),
        (Conditioning({"layer_gates": COND["layer_gates"]}, {"layer_gates": COND["layer_gates"]}), "no batch axis"),
    ],
)
def test_bad_conditioning_is_named(conditioning, message):
    with pytest.raises(InvalidInputError, match=message):
        inputs(conditioning, guided=True)


def test_uncond_inputs_need_a_cond_value():
    with pytest.raises(InvalidInputError, match="give every input in cond"):
        inputs(Conditioning({"layer_gates": COND["layer_gates"]}, {"kv_index": COND["kv_index"]}), guided=True)


def test_guided_halves_of_listed_rows_stack_along_the_list():
    """Mutual attention's inputs per listed row (mutual_rows) stack along that list, not along the batch."""
    spec = unet_spec(get_preset("tiny"), frozenset({"mutual"}), "float32", num_blocks=3)
    masks = torch.zeros(2, 1, 8, 8)
    cond = {
        "mutual_rows": torch.tensor([2]),
        "q_index": torch.tensor([[1], [0]]),
        "kv_index": torch.tensor([[1], [2]]),
        "self_key_masks": masks,
        "self_out_gates": masks + 1,
        "layer_gates": torch.ones(3, 2),
    }
    got = unet_inputs(spec, Conditioning(cond, {"self_key_masks": masks + 0.5}), ROWS, True, torch.device("cpu"))
    assert got["mutual_rows"].tolist() == [2, 5]
    assert got["q_index"].tolist() == [[1, 4], [0, 3]] and got["kv_index"].tolist() == [[1, 4], [2, 5]]
    assert got["self_key_masks"].shape == (2, 2, 8, 8)
    assert (got["self_key_masks"][:, 0] == 0.5).all() and (got["self_key_masks"][:, 1] == 0).all()  # uncond first
