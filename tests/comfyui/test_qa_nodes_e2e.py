"""Captioning and Q&A the way ComfyUI users work, in a real ComfyUI 0.3.75.

Caption Folder (captions written, summary, Cancel with nothing half-written, refusals),
several images in one question, the system prompt, video frame choice, and answers that
stream only whole characters. Node results are compared with the backend run in this process
on the same small random checkpoint, like with like (the same batch composition)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

SMALL = "vila-u-small-64"
server = cs.pack_server_fixture(SMALL)
QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def reference(server):
    """The same checkpoint in this process, run as the server runs it: one intra-op thread (other
    thread counts split fp32 sums otherwise and may flip a near-tie between two tokens)."""
    from vilau_backend.model.vila_u import VilaUModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield VilaUModel.load(server.models_dir / "vila-u" / SMALL, dtype="float32", device="cpu")
    torch.set_num_threads(threads)


def noise_png(path: Path, seed: int, size: tuple[int, int] = (20, 16)) -> torch.Tensor:
    """Write a noise PNG; return it as LoadImage gives it, (1, H, W, 3)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]


def model_node():
    return wa.loader_node(SMALL)


def answer_options(max_new_tokens=12, seed=0, greedy=True, **extra):
    return {"seed": seed, "max_new_tokens": max_new_tokens, "do_sample": not greedy, "temperature": 0.9,
            "top_k": 50, "top_p": 0.6, "repetition_penalty": 1.0, **extra}


def caption_node(folder: Path, **extra):
    inputs = {"model": ["1", 0], "folder": str(folder), "question": QUESTION, "existing_captions": "skip",
              "prefix": "", "suffix": "", "recursive": False, **answer_options()}
    inputs.update(extra)
    return {"class_type": "VILAU_CaptionFolder", "inputs": inputs}


# ---- Caption Folder ---------------------------------------------------------------------


def test_caption_folder_writes_captions_beside_images_and_a_summary(server, reference):
    from vilau_backend.tasks.understand import GREEDY, describe_images

    folder = server.input_dir / "qa13_dataset"  # Caption Folder stays inside ComfyUI's input and output
    images = {name: noise_png(folder / name, i) for i, name in enumerate(["a.png", "b.jpg", "c.png"])}
    (folder / "b.txt").write_text("kept")
    (folder / "sub").mkdir()
    noise_png(folder / "sub" / "d.png", 9)
    graph = {"1": model_node(),
             "2": caption_node(folder, prefix="ohwx, ", suffix=".", batch_size=2),
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    entry = server.run(graph, timeout=180)

    # a.png and c.png were captioned in one pass of two, b.jpg skipped: the backend does the same
    expected = describe_images(reference, [images["a.png"], images["c.png"]], QUESTION, batch=True, batch_size=2,
                               sampling=GREEDY, max_new_tokens=12)
    assert (folder / "a.txt").read_text(encoding="utf-8") == f"ohwx, {expected[0].text}."
    assert (folder / "c.txt").read_text(encoding="utf-8") == f"ohwx, {expected[1].text}."
    assert (folder / "b.txt").read_text() == "kept"
    assert sorted(p.name for p in folder.rglob("*")) == ["a.png", "a.txt", "b.jpg", "b.txt", "c.png", "c.txt",
                                                         "d.png", "sub"]
    [summary] = server.ui_text(entry, "3")
    assert summary.startswith(f"2 caption(s) written in {folder}, 1 image(s) skipped, 0 failed.")
    assert "skipped: b.jpg: b.txt exists" in summary

    # queued again unchanged, it runs again (the folder may have changed): now everything is skipped
    entry = server.run(graph, timeout=180)
    assert server.ui_text(entry, "3")[0].startswith("0 caption(s) written")


def test_cancel_during_caption_folder_leaves_only_whole_captions(server, reference):
    from vilau_backend.tasks.understand import GREEDY, describe_images

    folder = server.input_dir / "qa13_many"
    images = [noise_png(folder / f"img_{i:03d}.png", 100 + i) for i in range(60)]
    graph = {"1": model_node(), "2": caption_node(folder, batch_size=1, max_new_tokens=48)}
    with server.websocket() as ws:
        prompt_id = server.queue(graph, client_id=ws.client_id)
        ws.wait_for(lambda m: m.get("type") == "vilau.answer" and m["data"]["node"] == "2"
                    and m["data"]["text"].startswith("3 of 60"), timeout=180)
        server.interrupt()
        entry = server.wait(prompt_id, timeout=60, check=False)
    assert cs.was_interrupted(entry), entry["status"]

    written = sorted(folder.glob("*.txt"))
    assert 3 <= len(written) < 60, f"{len(written)} captions: the run was not stopped in the middle"
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"img_{i:03d}.png" for i in range(60)]
                                                              + [p.name for p in written])  # no temporary files
    for path in written:  # each caption whole: exactly the backend's answer for its image
        index = int(path.stem.split("_")[1])
        [answer] = describe_images(reference, images[index], QUESTION, sampling=GREEDY, max_new_tokens=48)
        assert path.read_text(encoding="utf-8") == answer.text, path.name
    assert [p.name for p in written] == [f"img_{i:03d}.txt" for i in range(len(written))]  # in order

    # the next run works and, skipping what exists, finishes the folder
    entry = server.run({"1": model_node(), "2": caption_node(folder, batch_size=8, max_new_tokens=4),
                        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}, timeout=300)
    assert server.ui_text(entry, "3")[0].startswith(f"{60 - len(written)} caption(s) written")
    assert len(list(folder.glob("*.txt"))) == 60


def test_caption_folder_refuses_a_missing_folder(server):
    with pytest.raises(cs.ExecutionFailed, match="does not exist"):
        server.run({"1": model_node(), "2": caption_node(server.input_dir / "nowhere")}, timeout=120)


# ---- several images, system prompt, streaming ------------------------------------------


def test_two_images_in_one_question_in_order(server, reference):
    from vilau_backend.tasks.understand import GREEDY, describe_images

    first = noise_png(server.input_dir / "qa13_first.png", 1)
    second = noise_png(server.input_dir / "qa13_second.png", 2, size=(30, 24))

    def ask(image, image_2):
        return {"class_type": "VILAU_ImageQA",
                "inputs": {"model": ["1", 0], "image": image, "image_2": image_2, "question": "Compare them.",
                           "batch_mode": "one answer per image", **answer_options()}}

    graph = {"1": model_node(),
             "2": {"class_type": "LoadImage", "inputs": {"image": "qa13_first.png"}},
             "3": {"class_type": "LoadImage", "inputs": {"image": "qa13_second.png"}},
             "4": ask(["2", 0], ["3", 0]),
             "5": ask(["3", 0], ["2", 0])}
    entry = server.run(graph, timeout=120)
    forward = describe_images(reference, [first, second], "Compare them.", sampling=GREEDY, max_new_tokens=12)[0]
    backward = describe_images(reference, [second, first], "Compare them.", sampling=GREEDY, max_new_tokens=12)[0]
    assert forward.input_ids.count(-200) == 2  # two image slots in one prompt
    assert server.ui_text(entry, "4") == [forward.text]
    assert server.ui_text(entry, "5") == [backward.text]
    assert forward.output_ids != backward.output_ids  # the order reaches the model


def test_system_prompt_input_reaches_the_prompt(server, reference):
    from vilau_backend.tasks.understand import GREEDY, describe_images

    image = noise_png(server.input_dir / "qa13_system.png", 3)
    system = "You write short captions."
    node = {"class_type": "VILAU_ImageQA",
            "inputs": {"model": ["1", 0], "image": ["2", 0], "question": QUESTION,
                       "batch_mode": "one answer per image", **answer_options(system_prompt=system)}}
    entry = server.run({"1": model_node(), "2": {"class_type": "LoadImage", "inputs": {"image": "qa13_system.png"}},
                        "3": node}, timeout=120)
    custom = describe_images(reference, image, QUESTION, system=system, sampling=GREEDY, max_new_tokens=12)[0]
    default = describe_images(reference, image, QUESTION, sampling=GREEDY, max_new_tokens=12)[0]
    assert custom.output_ids != default.output_ids
    assert server.ui_text(entry, "3") == [custom.text]


def test_question_preset_asks_its_question_and_leaves_the_box_unused(server, reference):
    from vilau_backend.decoding.prompts import QUESTION_PRESETS
    from vilau_backend.tasks.understand import GREEDY, describe_images

    image = noise_png(server.input_dir / "qa_preset.png", 5)
    load = {"class_type": "LoadImage", "inputs": {"image": "qa_preset.png"}}
    node = {"class_type": "VILAU_ImageQA",
            "inputs": {"model": ["1", 0], "image": ["2", 0], "question": "", "batch_mode": "one answer per image",
                       "preset": "comma-separated tags", **answer_options()}}
    entry = server.run({"1": model_node(), "2": load, "3": node}, timeout=120)  # an empty box is no error here
    tags = QUESTION_PRESETS["comma-separated tags"][0].format(media="image")
    expected = describe_images(reference, image, tags, sampling=GREEDY, max_new_tokens=12)[0]
    typed = describe_images(reference, image, QUESTION, sampling=GREEDY, max_new_tokens=12)[0]
    assert expected.output_ids != typed.output_ids  # the preset's question makes a difference here
    assert server.ui_text(entry, "3") == [expected.text]

    node["inputs"].update(question=QUESTION, preset="custom")
    assert server.ui_text(server.run({"1": model_node(), "2": load, "3": node}, timeout=120), "3") == [typed.text]


def test_caption_folder_with_a_preset_captions_with_its_question(server, reference):
    from vilau_backend.decoding.prompts import QUESTION_PRESETS
    from vilau_backend.tasks.understand import GREEDY, describe_images

    folder = server.input_dir / "qa13_presets"  # Caption Folder stays inside ComfyUI's input and output
    image = noise_png(folder / "a.png", 6)
    graph = {"1": model_node(), "2": caption_node(folder, question="", preset="short caption")}
    server.run(graph, timeout=180)
    short = QUESTION_PRESETS["short caption"][0].format(media="image")
    expected = describe_images(reference, [image], short, batch=True, sampling=GREEDY, max_new_tokens=12)[0]
    assert (folder / "a.txt").read_text(encoding="utf-8") == expected.text


def test_streamed_answers_never_show_a_partial_character(server, reference):
    from vilau_backend.tasks.understand import TextSampling, describe_images

    image = noise_png(server.input_dir / "qa13_stream.png", 4)
    tokenizer = reference.tokenizer

    def splits_a_character(seed: int) -> bool:
        # an answer in which some prefix decodes to a partial character (ends in U+FFFD)
        ids = describe_images(reference, image, QUESTION, sampling=TextSampling(), max_new_tokens=24,
                              seed=seed)[0].output_ids
        return any(tokenizer.decode(ids[:n], skip_special_tokens=True).strip().endswith("\ufffd")
                   for n in range(1, len(ids)))

    seed = next(s for s in range(40) if splits_a_character(s))
    node = {"class_type": "VILAU_ImageQA",
            "inputs": {"model": ["1", 0], "image": ["2", 0], "question": QUESTION,
                       "batch_mode": "one answer per image", **answer_options(24, seed=seed, greedy=False)}}
    with server.websocket() as ws:
        entry = server.run({"1": model_node(), "3": node,
                            "2": {"class_type": "LoadImage", "inputs": {"image": "qa13_stream.png"}}},
                           timeout=120, client_id=ws.client_id)
        streamed = [m["data"]["text"] for m in ws.of_type("vilau.answer")
                    if m["data"]["node"] == "3" and not m["data"]["done"]]
    [final] = server.ui_text(entry, "3")
    assert len(streamed) >= 2
    for text in streamed:  # every text shown on the way is the start of the answer, no U+FFFD stand-in at its end
        assert final.startswith(text), (text, final)
        assert not text.endswith("\ufffd"), text


# ---- video frame choice -----------------------------------------------------------------


def test_video_frame_choice_from_a_file_and_from_frames(server, reference):
    from vilau_backend.tasks.understand import GREEDY, describe_video
    from vilau_backend.media.video import FrameChoice, read_video, write_video_file

    levels = torch.linspace(0, 1, 20)
    frames = levels[:, None, None, None].expand(20, 32, 32, 3).contiguous()
    path = write_video_file(frames, server.input_dir / "qa13_ramp.mp4", fps=10)
    choice = dict(frame_count=3, frame_method="every", frame_step=4, start_frame=2, end_frame=-1)

    def ask(source: str, ref) -> dict:
        return {"class_type": "VILAU_VideoQA",
                "inputs": {"model": ["1", 0], source: ref, "question": "What changes?",
                           **answer_options(), **choice}}

    graph = {"1": model_node(),
             "2": {"class_type": "LoadVideo", "inputs": {"file": "qa13_ramp.mp4"}},
             "3": ask("video", ["2", 0]),
             "4": {"class_type": "GetVideoComponents", "inputs": {"video": ["2", 0]}},
             "5": ask("frames", ["4", 0]),
             "6": {"class_type": "VILAU_VideoQA",
                   "inputs": {"model": ["1", 0], "video": ["2", 0], "question": "What changes?", **answer_options()}}}
    entry = server.run(graph, timeout=180)
    wanted = FrameChoice(count=3, method="every", step=4, start=2)
    video = read_video(path, 8, choice=wanted)
    assert video.frame_indices == [2, 6, 10]
    expected = describe_video(reference, video.frames, "What changes?", choice=None, sampling=GREEDY,
                              max_new_tokens=12)
    assert expected.input_ids.count(-200) == 3
    assert server.ui_text(entry, "3") == [expected.text]
    assert server.ui_text(entry, "5") == [expected.text]  # the same frames, picked from the IMAGE batch
    # without the frame inputs: as the original, the model's num_video_frames evenly spaced (4 for the small model)
    num_frames = reference.config.num_video_frames
    default = describe_video(reference, read_video(path, num_frames).frames, "What changes?", choice=None,
                             sampling=GREEDY, max_new_tokens=12)
    assert default.input_ids.count(-200) == num_frames
    assert server.ui_text(entry, "6") == [default.text]


# ---- the loader's compile input -----------------------------------------------------------


def test_compile_on_says_compiling_once_and_answers_as_eager(server, reference):
    """Loader compile "on": the first Image Q&A run of its size compiles the answer step and says so
    on the node; a later run with another question (same cache bucket) replays it silently. Both
    answers are the eager in-process ones up to the first greedy step whose decision is not clear of
    the compiled kernels' rounding (conftest's first_unclear_steps)."""
    from conftest import first_unclear_steps
    from vilau_backend.tasks.image_splicing import prompt_embeddings
    from vilau_backend.tasks.understand import GREEDY, describe_images

    image = noise_png(server.input_dir / "compile_on.png", 5)

    def graph(question: str) -> dict:
        return {"1": wa.loader_node(SMALL, compile="on"),
                "2": {"class_type": "LoadImage", "inputs": {"image": "compile_on.png"}},
                "3": {"class_type": "VILAU_ImageQA",
                      "inputs": {"model": ["1", 0], "image": ["2", 0], "question": question,
                                 "batch_mode": "one answer per image", **answer_options()}}}

    statuses = []
    for question in (QUESTION, "What is in the picture?"):
        with server.websocket() as ws:
            entry = server.run(graph(question), timeout=600, client_id=ws.client_id)
            statuses.append(ws.progress_texts("3"))
        expected = describe_images(reference, image, question, sampling=GREEDY, max_new_tokens=12)[0]
        prompt = prompt_embeddings(reference, expected.input_ids, reference.preprocess(image))
        [agree] = first_unclear_steps(reference, [prompt], [expected.output_ids])
        [answer] = server.ui_text(entry, "3")
        if agree == len(expected.output_ids):
            assert answer == expected.text
        else:  # compiled kernels may settle a near-tie the other way from there on
            assert answer.startswith(reference.tokenizer.decode(expected.output_ids[:agree], skip_special_tokens=True))
    # the node says that this run compiles, and that Cancel waits for the compiler
    assert ("compiling… (the first run of this batch size; later runs are faster; Cancel takes effect when "
            "compiling ends)") in statuses[0], statuses[0]
    assert not any(text.startswith("compiling") for text in statuses[1]), statuses[1]
