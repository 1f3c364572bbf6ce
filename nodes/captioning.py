"""VILA-U Caption Folder: a caption file beside every image of a folder (e.g. for LoRA training sets)."""

from __future__ import annotations

import time

from comfy_api.latest import io

from ..vilau_backend.tasks.captioning import CaptionSettings
from .caption_roots import resolve_caption_folder
from ..vilau_backend.decoding.prompts import CUSTOM_QUESTION
from .model_cache import releases_after_use
from .progress import CaptionProgress, send_answer
from .schema import CATEGORY, advanced, check_combo, model_input
from .understanding import MAX_BATCH_SIZE, QuestionNode, answer_inputs, preset_input, text_sampling

SKIP = "skip"
OVERWRITE = "overwrite"


class CaptionFolder(QuestionNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        defaults = CaptionSettings()
        return io.Schema(
            node_id="VILAU_CaptionFolder",
            display_name="VILA-U Caption Folder",
            category=CATEGORY,
            description=(
                "Captions every image of a folder and writes each caption beside its image as "
                "'<image name>.txt' (the layout LoRA trainers read). Images are read a batch at a time, so "
                "large folders work; Cancel keeps the captions already written, and no caption file is ever "
                "left half-written."
            ),
            inputs=[
                model_input(),
                io.String.Input(
                    "folder", default="",
                    tooltip="The folder of images (png, jpg, webp, bmp, tiff): a path relative to ComfyUI's input "
                    "folder, or an absolute path inside ComfyUI's input or output folder (other folders only where "
                    "the server's configuration allows them). Only '<image name>.txt' files are written, beside "
                    "their images. Images over 64 megapixels, links out of the folder and special files are "
                    "skipped and named in the summary.",
                ),
                io.String.Input(
                    "question", multiline=True, default=defaults.question,
                    tooltip="What to ask about each image; its answer is the caption. Must not be empty.",
                ),
                io.Combo.Input(
                    "existing_captions", options=[SKIP, OVERWRITE], default=OVERWRITE if defaults.overwrite else SKIP,
                    tooltip=f"{SKIP}: images that already have a .txt keep it (resume an interrupted run). "
                    f"{OVERWRITE}: caption them again and replace the file.",
                ),
                io.String.Input(
                    "prefix", default=defaults.prefix,
                    tooltip="Put in front of every caption exactly as typed, e.g. a trigger word with its "
                    "separator: 'ohwx, '. Text only: it never becomes part of a file name.",
                ),
                io.String.Input(
                    "suffix", default=defaults.suffix,
                    tooltip="Put after every caption exactly as typed, e.g. ', ohwx style'.",
                ),
                io.Boolean.Input(
                    "recursive", default=defaults.recursive,
                    tooltip="Also caption the images in subfolders (links to folders are never followed).",
                ),
                *answer_inputs(),
                advanced(
                    io.Int.Input,
                    "batch_size", default=defaults.batch_size, min=1, max=MAX_BATCH_SIZE, optional=True,
                    tooltip="Advanced: how many images are captioned together in one pass (and held in memory). "
                    "Larger is faster per image and takes more memory.",
                ),
                preset_input("image"),
            ],
            outputs=[io.String.Output(
                display_name="summary", tooltip="How many captions were written, skipped or failed, and why.",
            )],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        # the folder's files change outside the graph: run again every time the workflow is queued
        return time.time()

    @classmethod
    @releases_after_use
    def execute(
        cls, model, folder: str, question: str, existing_captions: str, prefix: str, suffix: str, recursive: bool,
        seed: int, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float,
        repetition_penalty: float, system_prompt: str = CaptionSettings.system,
        batch_size: int = CaptionSettings.batch_size, preset: str = CUSTOM_QUESTION,
    ) -> io.NodeOutput:
        from ..vilau_backend.tasks.captioning import caption_folder
        from ..vilau_backend.decoding.prompts import preset_question

        check_combo("existing_captions", existing_captions, [SKIP, OVERWRITE])
        folder = resolve_caption_folder(folder)  # refused before the model is loaded
        settings = CaptionSettings(
            question=preset_question(preset, question, "image"), prefix=prefix, suffix=suffix,
            overwrite=existing_captions == OVERWRITE,
            recursive=recursive, system=system_prompt, max_new_tokens=max_new_tokens, seed=seed,
            sampling=text_sampling(do_sample, temperature, top_k, top_p, repetition_penalty), batch_size=batch_size,
            compile=model.compile,
        )
        progress = CaptionProgress(cls.hidden.unique_id, max_new_tokens)
        report = caption_folder(model.ready(), folder, settings, on_progress=progress,
                                on_compile=progress.on_compile)
        summary = report.summary()
        send_answer(cls.hidden.unique_id, [summary], done=True)
        return io.NodeOutput(summary, ui={"text": [summary]})

