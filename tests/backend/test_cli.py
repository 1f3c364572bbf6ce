"""`python -m vilau_backend` encode / decode / generate-image / generate-video / describe, as other tools call it."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import av
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import FRAMES_DIR, GOLDEN_CHECKPOINT, REFERENCE, REPO, recorded, reference
import vilau_backend.cli as cli
from vilau_backend.cli import main as cli_main
from vilau_backend.tasks.generate import ImageSampling, generate_codes

IMAGE_QUERY = "Describe the image."
VIDEO_QUERY = "Describe the video."


def run_cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vilau_backend", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_the_docstring_lists_every_subcommand_with_options_it_has():
    listed = {}
    usage = cli.__doc__.split("Subcommands", 1)[1].split("\n\n", 1)[0]
    for line in usage.splitlines()[1:]:
        name, _, options = line.strip().partition(" ")
        listed[name] = set(re.findall(r"--[a-z-]+", options))
    [sub] = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(listed) == set(sub.choices)
    for name, options in listed.items():
        known = {flag for action in sub.choices[name]._actions for flag in action.option_strings}
        assert options <= known, f"{name}: the docstring names {sorted(options - known)}, which it does not take"


def test_encode_writes_int64_codes_equal_to_the_original(tmp_path):
    out = tmp_path / "codes.safetensors"
    run_cli("encode", "--model", str(GOLDEN_CHECKPOINT), "--image", str(REFERENCE / "inputs" / "chelsea.png"),
            "--image", str(REFERENCE / "inputs" / "coffee.png"), "--out", str(out), "--dtype", "float32", "--device", "cpu")
    codes = load_file(str(out))["codes"]
    assert codes.dtype == torch.int64 and codes.shape == (2, 16, 16, 4)
    # all but near-tied codes (test_vision_parity checks those against the original's recording)
    agreement = (codes == reference("encode_fp32.safetensors")["codes"]).float().mean().item()
    assert agreement > 0.99, f"only {agreement:.4f} of the codes equal the original's"


def test_decode_writes_one_png_per_code_grid_close_to_the_original(tmp_path):
    codes = tmp_path / "codes.safetensors"
    save_file({"codes": reference("encode_bf16.safetensors")["codes"]}, str(codes))
    # fp32: bf16 convolutions on a CPU take minutes on one thread (test_vision_parity checks the bf16
    # decode); fp32 against the original's bf16 recording measured max 5, mean 0.65 levels of 255
    run_cli("decode", "--model", str(GOLDEN_CHECKPOINT), "--codes", str(codes), "--out-dir", str(tmp_path / "out"),
            "--dtype", "float32")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["image_0.png", "image_1.png"]
    diff = np.abs(png(tmp_path / "out" / "image_1.png") - png(REFERENCE / "decode_bf16_coffee.png"))
    assert diff.max() <= 8 and diff.mean() < 1.0


def test_decode_without_codes_tensor_fails_with_a_message(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"tokens": torch.zeros(1, 2, 2, 4, dtype=torch.int64)}, str(bad))
    result = subprocess.run([sys.executable, "-m", "vilau_backend", "decode", "--model", str(GOLDEN_CHECKPOINT),
                             "--codes", str(bad), "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "has no tensor named 'codes' (found: tokens)" in result.stderr


def test_generate_image_writes_pngs_and_the_codes_the_backend_makes(tmp_path, small_checkpoint, small_model):
    run_cli("generate-image", "--model", str(small_checkpoint), "--prompt", "a red apple", "--num", "2", "--seed", "4",
            "--save-dir", str(tmp_path), "--save-codes", str(tmp_path / "codes.safetensors"), "--dtype", "float32")
    codes = load_file(str(tmp_path / "codes.safetensors"))["codes"]
    expected = generate_codes(small_model, "a red apple", num_images=2, seed=4, sampling=ImageSampling()).cpu()
    assert codes.dtype == torch.int64 and torch.equal(codes, expected)
    size = small_model.config.image_size
    for i in range(2):
        image = png(tmp_path / f"image_{i}.png")
        assert image.shape == (size, size, 3)
        decoded = (small_model.decode_codes(codes[i : i + 1])[0] * 255).to(torch.uint8).numpy().astype(int)
        # decoded alone rather than in a batch of two: float32 rounding may move a pixel by one level
        assert np.abs(image - decoded).max() <= 1


def test_generate_video_writes_mp4_frames_and_codes(tmp_path, small_checkpoint):
    run_cli("generate-video", "--model", str(small_checkpoint), "--prompt", "fireworks", "--frames", "3", "--fps", "6",
            "--save-dir", str(tmp_path), "--save-codes", str(tmp_path / "codes.safetensors"), "--top-k", "1")
    codes = load_file(str(tmp_path / "codes.safetensors"))["codes"]
    assert codes.shape == (1, 3, 8, 8, 4)
    with av.open(str(tmp_path / "video_0.mp4")) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == 6
    assert len(frames) == 3 and frames[0].shape == (64, 64, 3)
    assert sorted(p.name for p in tmp_path.glob("video_0_frame_*.png")) == [f"video_0_frame_{i:03d}.png" for i in range(3)]


# ---- describe --------------------------------------------------------------------------


def describe_json(*args: str) -> dict:
    done = run_cli("describe", "--model", str(GOLDEN_CHECKPOINT), "--dtype", "float32", "--device", "cpu", "--json", *args)
    return json.loads(done.stdout)


def test_describe_images_prints_the_recorded_answer_as_json():
    expected = recorded("understanding_image_fp32")
    photo = str(REFERENCE / "inputs" / "chelsea.png")
    coffee = str(REFERENCE / "inputs" / "coffee.png")
    out = describe_json("--image", photo, "--image", coffee, "--batch", "--query", IMAGE_QUERY, "--greedy",
                    "--max-new-tokens", "12")
    assert set(out) == {"answers", "input_ids", "output_ids"}
    assert len(out["answers"]) == len(out["input_ids"]) == len(out["output_ids"]) == 2
    assert out["answers"][0] == expected["response"]
    assert out["input_ids"] == [expected["input_ids"]] * 2
    assert out["output_ids"][0] == expected["output_ids"][1:]


def test_describe_compile_says_it_compiles_and_prints_the_recorded_answer():
    """--compile runs the compiled answer step (tests/backend/test_compiled_answers.py: equal to eager on this run)."""
    expected = recorded("understanding_image_fp32")
    result = run_cli("describe", "--model", str(GOLDEN_CHECKPOINT), "--dtype", "float32", "--device", "cpu",
                     "--image", str(REFERENCE / "inputs" / "chelsea.png"), "--query", IMAGE_QUERY, "--greedy",
                     "--max-new-tokens", "12", "--compile", "--json")
    assert "compiling the step" in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["output_ids"] == [expected["output_ids"][1:]]


def test_describe_video_folder_prints_the_recorded_answer_as_json():
    expected = recorded("understanding_video_fp32")
    out = describe_json("--video", str(FRAMES_DIR), "--query", VIDEO_QUERY, "--greedy", "--max-new-tokens", "12")
    assert out == {
        "answers": [expected["response"]],
        "input_ids": [expected["input_ids"]],
        "output_ids": [expected["output_ids"][1:]],
    }


def test_describe_rejects_greedy_with_sampling_settings(capsys):
    code = cli_main(["describe", "--model", str(GOLDEN_CHECKPOINT), "--image", "x.png", "--query", "q",
                     "--greedy", "--temperature", "0.5"])
    assert code == 2
    assert "--greedy" in capsys.readouterr().err
