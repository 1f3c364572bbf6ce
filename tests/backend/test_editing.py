"""Editing in code space: generate_codes with given codes and a keep mask, and the masks of each edit.

The small random model (8x8 grid, depth 4, 256 codes) runs in float32 on the CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import llm_hidden_bounds

from vilau_backend.tasks.editing import (
    depths_for_strength,
    edit_codes,
    extend_video_codes,
    inpaint,
    keep_depths,
    keep_frames,
    keep_positions,
    keep_rows,
    mask_coverage,
    model_view,
    paste_outside,
    regenerate_from_mask,
    repeat_sources,
)
from vilau_backend.errors import InputError
from vilau_backend.tasks.generate import ImageSampling, _code_loop, _edit_inputs, generate_codes
from vilau_backend.decoding.compiled_steps import cache_length, step_key
from vilau_backend.decoding.position_step import PositionState, advance, code_inputs
from vilau_backend.decoding.prompts import cfg_batch

PROMPT = "a red apple on a table"
SAMPLED = ImageSampling()  # the original's defaults: cfg 3, top-k 900, top-p 0.96
GREEDY = ImageSampling(top_k=1)


@pytest.fixture(scope="module")
def source(small_model) -> torch.Tensor:
    """Codes of two images to edit (B, h, w, D): generated from another prompt and seed."""
    return generate_codes(small_model, "a blue house", num_images=2, seed=99)


def test_keeping_everything_gives_back_the_given_codes(small_model, source):
    keep = torch.ones(2, 64, 4, dtype=torch.bool)
    codes = edit_codes(small_model, PROMPT, source, keep, sampling=SAMPLED, seed=1)
    assert torch.equal(codes, source)


def test_keeping_nothing_is_plain_generation_with_the_same_seed(small_model, source):
    keep = torch.zeros(2, 64, 4, dtype=torch.bool)
    edited = edit_codes(small_model, PROMPT, source, keep, sampling=SAMPLED, seed=5)
    plain = generate_codes(small_model, PROMPT, num_images=2, sampling=SAMPLED, seed=5)
    # same kernels, same shapes, same draws: bit-identical
    assert torch.equal(edited, plain), f"{(edited != plain).sum()} codes differ"


def test_inpaint_keeps_unmasked_positions_exactly_and_samples_the_masked_ones(small_model, source):
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0  # rows 2..5, columns 1..4 of the 8x8 grid
    regenerate = regenerate_from_mask(mask, (8, 8)).expand(2, -1, -1)
    codes = edit_codes(small_model, PROMPT, source, keep_positions(regenerate, 4), sampling=SAMPLED, seed=3)
    kept, masked = ~regenerate, regenerate
    assert int(masked.sum()) == 2 * 16
    assert torch.equal(codes[kept], source[kept])
    changed = (codes[masked] != source[masked]).float().mean().item()
    # a sampled code equals the source's only by chance (1 in a few hundred codes here)
    assert changed > 0.9, f"only {changed:.0%} of the masked codes changed"


def test_vary_by_depth_keeps_the_first_depths_of_every_position(small_model, source):
    k = depths_for_strength(0.5, 4)
    assert k == 2
    codes = edit_codes(small_model, PROMPT, source, keep_depths(2, 64, 4, k), sampling=SAMPLED, seed=3)
    assert torch.equal(codes[..., :2], source[..., :2])
    changed = (codes[..., 2:] != source[..., 2:]).float().mean().item()
    assert changed > 0.9, f"only {changed:.0%} of the finer codes changed"


def test_forced_codes_feed_later_depths_and_positions(small_model, source):
    """The same sampled depths differ when the kept coarse depth differs: the forced code is context."""
    keep = keep_depths(2, 64, 4, 1)
    a = edit_codes(small_model, PROMPT, source, keep, sampling=GREEDY)
    other = source.clone()
    other[..., 0] = (other[..., 0] + 17) % 256
    b = edit_codes(small_model, PROMPT, other, keep, sampling=GREEDY)
    assert torch.equal(b[..., 0], other[..., 0])
    assert (a[..., 1:] != b[..., 1:]).float().mean() > 0.5


def test_continue_keeps_the_first_rows_and_regenerates_the_rest(small_model, source):
    codes = edit_codes(small_model, PROMPT, source, keep_rows(2, (8, 8), 4, 3), sampling=SAMPLED, seed=4)
    assert torch.equal(codes[:, :3], source[:, :3])
    assert (codes[:, 3:] != source[:, 3:]).float().mean() > 0.9


def test_num_images_in_an_edit_is_the_edits_of_each_source(small_model, source):
    """Two sources, three edits of each: six edits, source after source, equal to one edit of each of
    the six repeated sources (same batch, same seed indices)."""
    keep = keep_rows(2, (8, 8), 4, 3)
    codes = edit_codes(small_model, PROMPT, source, keep, num_images=3, sampling=SAMPLED, seed=4)
    assert codes.shape == (6, 8, 8, 4)
    assert torch.equal(codes[:3, :3], source[:1, :3].expand(3, -1, -1, -1))
    assert torch.equal(codes[3:, :3], source[1:, :3].expand(3, -1, -1, -1))
    repeated = edit_codes(small_model, PROMPT, repeat_sources(source, 3), repeat_sources(keep, 3), sampling=SAMPLED,
                          seed=4)
    assert torch.equal(codes, repeated)


def test_inpaint_maps_the_mask_repeats_it_with_the_edits_and_pastes_the_sources_back(small_model, source):
    """Inpaint from a pixel mask, as the node and the command line call it: the regenerated output is the
    mask's grid positions for every edit of a source, the codes outside them are the source's, and the
    source pixels (as the model sees them) come back outside the regenerated positions."""
    S = small_model.config.image_size
    mask = torch.zeros(S, S)
    mask[: S // 2, : S // 4] = 1.0  # rows 0..3, columns 0..1 of the 8x8 grid
    images = small_model.decode_codes(source)  # (2, S, S, 3): the sources as images
    result = inpaint(small_model, PROMPT, source, mask, images=images, feather=0, num_images=2, seed=3)
    positions = torch.zeros(8, 8, dtype=torch.bool)
    positions[:4, :2] = True
    pixels = positions.repeat_interleave(S // 8, 0).repeat_interleave(S // 8, 1)  # (S, S)
    assert result.regenerated.shape == (4, S, S)
    assert torch.equal(result.regenerated, pixels.float().expand(4, -1, -1))
    kept = ~positions
    for i in range(4):
        assert torch.equal(result.codes[i][kept], source[i // 2].cpu()[kept]), i
    original = model_view(small_model, images).repeat_interleave(2, dim=0)  # (4, S, S, 3)
    assert torch.equal(result.images[:, ~pixels], original[:, ~pixels])
    assert not torch.equal(result.images[:, pixels], original[:, pixels])


def test_video_extension_keeps_the_given_frames(small_model):
    given = generate_codes(small_model, "a boat", frames=2, seed=8)[0]  # (2, h, w, D)
    video = extend_video_codes(small_model, PROMPT, given, 4, num_images=2, sampling=SAMPLED, seed=1)
    assert video.shape == (2, 4, 8, 8, 4)
    assert torch.equal(video[:, :2], given.expand(2, -1, -1, -1, -1))
    assert not torch.equal(video[0, 2:], video[1, 2:])  # two videos, two continuations


def _state(model, n_positions: int, given: torch.Tensor, keep: torch.Tensor) -> PositionState:
    """A greedy generation state for two images whose codes `given` (2, P, D) are forced where `keep`."""
    ids, mask = cfg_batch(model.tokenizer, PROMPT, " ", n=2, video=False)
    state = PositionState(model, step_key(model, 4, cache_length(ids.shape[1], n_positions)))
    state.begin(ids, mask, torch.zeros(given.shape), GREEDY, given=given, keep=keep)
    return state


def test_prefilled_prefix_gives_the_hidden_states_of_stepping_through_it(small_model, source):
    """Prefill (one forward over prompt + n positions) and stepping are different kernels (a batched
    matmul against a single-row one), so fp32 results agree to rounding, not bit for bit: within the
    rounding bound of each path (tests/conftest.py, llm_hidden_bounds)."""
    codes = source.reshape(2, 64, 4)
    every = torch.ones(2, 64, 4, dtype=torch.bool)  # the steps feed exactly these codes
    n = 19  # two rows and three positions
    prefilled, stepped = _state(small_model, 64, codes, every), _state(small_model, 64, codes, every)
    with torch.inference_mode(), llm_hidden_bounds(small_model, prefilled.key_mask.shape[-1]) as bounds:
        prefilled.prefill(small_model, code_inputs(small_model, codes[:, :n]))
        stepped.prefill(small_model)
        for p in range(n):
            advance(small_model, stepped, stepped.grid_indices[p])
        after_prefill, after_step = [prefilled.hidden.clone()], [stepped.hidden.clone()]
        for p in range(n, n + 4):  # the same inputs continue both
            for state, seen in ((prefilled, after_prefill), (stepped, after_step)):
                advance(small_model, state, state.grid_indices[p])
                seen.append(state.hidden.clone())
    # the LLM forwards in order: prefilled's prefill, stepped's prefill, n steps, then the pairs of steps
    prefill_bounds = [bounds.bounds[0]] + bounds.bounds[n + 2 :: 2]
    step_bounds = [bounds.bounds[n + 1]] + bounds.bounds[n + 3 :: 2]
    assert len(bounds.bounds) == n + 2 + 8
    for a, b, bound_a, bound_b in zip(after_prefill, after_step, prefill_bounds, step_bounds):
        bound = torch.maximum(bound_a, bound_b)
        excess = ((a - b).abs() - bound).max().item()
        print(f"hidden states: max |diff| {(a - b).abs().max().item():.1e}, bound {bound.min().item():.1e}..{bound.max().item():.1e}")
        assert excess <= 0, f"hidden states exceed the rounding bound by {excess:.2e}"


def test_prefilled_prefix_gives_the_codes_of_stepping_through_it(small_model, source):
    """Teacher-forced agreement: the codes stepping through a kept prefix picks (greedy) are what the
    prefilled stream picks at every decision whose top-1/top-2 guided-logit gap exceeds a margin
    (1e-3: over 200 times the hidden-state differences measured above, times guidance's
    amplification 2*cfg-1 = 5); near-ties below it may go either way on another CPU.
    Measured: 319 of 320 decisions clear the margin (smallest gap 4.5e-4), all of them agree."""
    keep = keep_rows(2, (8, 8), 4, 3)
    edit = _edit_inputs(small_model, source, keep, (2, 64, 4))
    assert edit.prefix == 24
    with torch.inference_mode():  # start 0: the kept rows are stepped through, not prefilled
        stepped = _code_loop(small_model, _state(small_model, 64, edit.given, edit.keep), 64, 0, False, None, None)
    assert torch.equal(stepped[:, :24], source.reshape(2, 64, 4)[:, :24])

    state = _state(small_model, 64, stepped, torch.ones(2, 64, 4, dtype=torch.bool))
    depth, embed = small_model.vision.depth, small_model.vision.quantizer.embed_codes
    agree = checked = 0
    with torch.inference_mode():
        state.prefill(small_model, code_inputs(small_model, stepped[:, :24]))
        for p in range(24, 64):
            logits = depth(state.hidden, stepped[:, p].repeat(2, 1), embed)  # (R, D, V)
            guided = (logits[2:] + GREEDY.cfg * (logits[:2] - logits[2:])).float()  # (B, D, V)
            top2 = guided.topk(2, dim=-1).values
            clear = (top2[..., 0] - top2[..., 1]) > 1e-3
            agree += int(((guided.argmax(-1) == stepped[:, p]) & clear).sum())
            checked += int(clear.sum())
            advance(small_model, state, state.grid_indices[p])  # feeds stepped[:, p]
    assert checked > 0.9 * 2 * 40 * 4, f"only {checked} decisions were clear of near-ties"
    assert agree == checked, f"{checked - agree} of {checked} clear decisions differ"


def test_mask_coverage_follows_the_model_geometry():
    mask = torch.zeros(1, 32, 64)  # a wide image: its left half masked
    mask[:, :, :32] = 1
    resized = mask_coverage(mask, (8, 8), "resize")
    assert torch.equal(resized[0, :, :4], torch.ones(8, 4)) and torch.equal(resized[0, :, 4:], torch.zeros(8, 4))
    padded = mask_coverage(mask, (8, 8), "pad")  # centred on a 64x64 square: rows 2..5 hold the image
    assert torch.equal(padded[0, 2:6, :4], torch.ones(4, 4))
    assert padded[0, :2].sum() == 0 and padded[0, 6:].sum() == 0 and padded[0, :, 4:].sum() == 0


def test_mask_threshold_and_grow():
    mask = torch.zeros(64, 64)
    mask[8:16, 8:12] = 1  # half of position (1, 1)
    mask[40:48, 40:48] = 1  # all of position (5, 5)
    half = regenerate_from_mask(mask, (8, 8), threshold=0.5)[0]
    most = regenerate_from_mask(mask, (8, 8), threshold=0.75)[0]
    assert half.nonzero().tolist() == [[1, 1], [5, 5]]
    assert most.nonzero().tolist() == [[5, 5]]
    grown = regenerate_from_mask(mask, (8, 8), threshold=0.75, grow=1)[0]
    assert grown.sum() == 9 and grown[4:7, 4:7].all()


def test_keep_masks_have_the_generation_shape():
    assert keep_frames(2, 1, 3, (8, 8), 4).shape == (2, 192, 4)
    assert keep_frames(2, 1, 3, (8, 8), 4)[:, :64].all() and not keep_frames(2, 1, 3, (8, 8), 4)[:, 64:].any()
    assert keep_rows(1, (8, 8), 4, 2).reshape(8, 8, 4)[:2].all()
    assert depths_for_strength(0.0, 16) == 16 and depths_for_strength(1.0, 16) == 0


def test_paste_outside_restores_the_original_away_from_the_edge():
    original, edited = torch.zeros(1, 64, 64, 3), torch.ones(1, 64, 64, 3)
    regenerate = torch.zeros(1, 8, 8, dtype=torch.bool)
    regenerate[0, 2:6, 2:6] = True  # pixels 16..47
    out = paste_outside(original, edited, regenerate, feather=2)
    assert out[0, :10].max() == 0 and out[0, :, 54:].max() == 0  # far outside: the original
    assert out[0, 22:42, 22:42].min() == 1  # far inside: the edit
    edge = out[0, 32, 12:22, 0]
    assert 0 < edge.min() < 1 or 0 < edge.max() < 1  # a ramp across the edge
    assert torch.equal(paste_outside(original, edited, regenerate, feather=0)[0, 16:48, 16:48], edited[0, 16:48, 16:48])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(given_codes=torch.zeros(2, 64, 4, dtype=torch.long)), "needs both"),
        (dict(given_codes=torch.zeros(2, 63, 4, dtype=torch.long), keep=torch.ones(2, 63, 4, dtype=torch.bool)), "must hold"),
        (dict(given_codes=torch.zeros(2, 64, 4, dtype=torch.long), keep=torch.ones(2, 64, 4)), "bool"),
        (dict(given_codes=torch.full((2, 64, 4), 999), keep=torch.ones(2, 64, 4, dtype=torch.bool)), "0..255"),
    ],
)
def test_bad_edits_say_what_to_fix(small_model, kwargs, message):
    with pytest.raises(InputError, match=message):
        generate_codes(small_model, PROMPT, num_images=2, **kwargs)


def test_cli_edit_inpaints_from_an_image_and_a_mask_file(small_checkpoint, small_model, tmp_path):
    import numpy as np
    from PIL import Image

    from vilau_backend.cli import main

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:16] = 255  # the top two grid rows
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code = main(["edit", "--model", str(small_checkpoint), "--image", str(tmp_path / "in.png"), "--mode", "inpaint",
                 "--mask", str(tmp_path / "mask.png"), "--feather", "0", "--prompt", PROMPT, "--num", "2",
                 "--save-dir", str(tmp_path / "out"), "--save-codes", str(tmp_path / "codes.safetensors")])
    assert code == 0
    edits = [np.asarray(Image.open(tmp_path / "out" / f"edit_{i}.png")) for i in range(2)]
    for edit in edits:  # a 64 px image at the model's 64 px: pasted back exactly below the mask
        assert np.array_equal(edit[16:], pixels[16:])
        assert np.abs(edit[:16].astype(int) - pixels[:16]).mean() > 20
    assert not np.array_equal(edits[0][:16], edits[1][:16])

    from safetensors.torch import load_file

    codes = load_file(str(tmp_path / "codes.safetensors"))["codes"]
    assert codes.shape == (2, 8, 8, 4)
    # the edits of tasks/editing.py's inpaint, which the Inpaint node calls too
    image = torch.from_numpy(pixels).float().div(255)[None]
    expected = inpaint(small_model, PROMPT, small_model.encode_images(image).codes, torch.from_numpy(mask).float() / 255,
                       images=image, feather=0, num_images=2)
    assert torch.equal(codes, expected.codes)
