"""The VILA-U LATENT helpers (nodes/vilau_latent.py): which model made a latent, and codes made
stale by core latent nodes. The core nodes are reproduced by what they do to the dict in
ComfyUI 0.3.75 and the newest ComfyUI: copy it, replace `samples`, keep every other key."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import pack_module


@pytest.fixture(scope="module")
def latents():
    return pack_module("vilau_latent")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second small random model of the same geometry (same channels, same grid), other weights."""
    from vilau_backend.model.vila_u import VilaUModel
    from vilau_backend.testing.random_checkpoint import write_random_checkpoint

    return VilaUModel.load(write_random_checkpoint(tmp_path_factory.mktemp("other") / "vila-u-other", seed=3), "float32")


@pytest.fixture(scope="module")
def encoded(small_model, latents):
    images = torch.rand(2, 40, 48, 3, generator=torch.Generator().manual_seed(0))
    result = small_model.encode_images(images)
    return latents.make_vilau_latent(small_model, result.features, result.codes)


def core_edit(latent: dict, samples: torch.Tensor) -> dict:
    """What Latent Blend, Upscale Latent and Latent From Batch do: copy, replace samples."""
    out = latent.copy()
    out["samples"] = samples
    return out


def test_latent_reads_back_its_codes_and_features(small_model, latents, encoded):
    codes = latents.vilau_latent_codes(small_model, encoded)
    assert torch.equal(codes, encoded["vilau_codes"])
    features = latents.vilau_latent_features(small_model, encoded)
    assert torch.equal(features, encoded["samples"].permute(0, 2, 3, 1))
    assert encoded["vilau_model"]["name"] == small_model.config.root.name


def test_the_stamp_is_the_same_for_every_dtype_of_one_checkpoint(small_model, small_checkpoint, latents, encoded):
    from vilau_backend.model.vila_u import VilaUModel

    bf16 = VilaUModel.load(small_checkpoint, "bfloat16")
    assert latents.model_stamp(bf16) == encoded["vilau_model"]
    # the bf16 model's sums differ from the fp32 latent by bf16 rounding only: codes still accepted
    assert torch.equal(latents.vilau_latent_codes(bf16, encoded), encoded["vilau_codes"])


def test_a_latent_of_another_model_is_refused_by_name(other_model, latents, encoded):
    assert latents.model_stamp(other_model)["latent_space"] != encoded["vilau_model"]["latent_space"]
    for read in (latents.vilau_latent_features, latents.vilau_latent_codes):
        with pytest.raises(ValueError, match="made by the VILA-U model 'vila-u-small', whose codebooks differ "
                                             "from those of 'vila-u-other'"):
            read(other_model, encoded)


@pytest.mark.parametrize("edit", ["blend", "upscale", "from_batch"])
def test_codes_made_stale_by_a_core_latent_node_are_refused_but_still_decode(small_model, latents, encoded, edit):
    samples = encoded["samples"]
    if edit == "blend":
        edited = core_edit(encoded, samples * 0.5 + samples.flip(0) * 0.5)
    elif edit == "upscale":
        edited = core_edit(encoded, torch.nn.functional.interpolate(samples, scale_factor=2, mode="nearest"))
    else:
        edited = core_edit(encoded, samples[1:2].clone())
    with pytest.raises(ValueError, match="codes are stale"):
        latents.vilau_latent_codes(small_model, edited)
    h, w = small_model.config.grid
    assert latents.vilau_latent_features(small_model, edited).shape[1:3] == (h, w)  # decoding still works


def test_a_saved_and_loaded_latent_decodes_but_has_no_codes(small_model, latents, encoded):
    loaded = {"samples": encoded["samples"].clone()}  # core LoadLatent keeps only the samples
    assert torch.equal(latents.vilau_latent_features(small_model, loaded), encoded["samples"].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="carries no VILA-U codes"):
        latents.vilau_latent_codes(small_model, loaded)


@pytest.mark.parametrize(
    "latent, message",
    [
        ({}, "has no 'samples' tensor"),
        ({"samples": "not a tensor"}, "has no 'samples' tensor"),
        ({"samples": torch.zeros(0, 64, 8, 8)}, "is an empty batch"),
        ({"samples": torch.zeros(1, 64, 0, 0)}, "has an empty grid"),
        ({"samples": torch.zeros(1, 4, 8, 8)}, "not a VILA-U latent of this model: its samples are 1x4x8x8"),
        ({"samples": torch.full((1, 64, 8, 8), float("nan"))}, "NaN or infinite"),
    ],
)
def test_bad_latents_say_what_is_wrong(small_model, latents, latent, message):
    with pytest.raises(ValueError, match=message):
        latents.vilau_latent_features(small_model, latent)


def test_a_model_whose_folder_is_gone_still_makes_latents(small_checkpoint, tmp_path, latents, encoded):
    from vilau_backend.model.vila_u import VilaUModel

    moved = shutil.copytree(small_checkpoint, tmp_path / "vila-u-moved")
    model = VilaUModel.load(moved, "float32")
    shutil.rmtree(moved)  # deleted after loading: the codebooks can no longer be hashed
    assert latents.model_stamp(model) == {"name": "vila-u-moved", "latent_space": None}
    assert latents.vilau_latent_features(model, encoded).shape[0] == 2  # not compared, not failed
