"""VILA-U Inpaint, Variations, Continue Image and Extend Video: editing in the model's code space.

One node per edit rather than one node with a mode: each edit has its own knobs (a mask with
threshold, grow and feather; a strength; rows; frames), and a node shows only what applies, as
ComfyUI's own inpaint and img2img nodes do. All four are masks over one backend call
(vilau_backend/tasks/editing.py): the source's codes are kept where the edit says and the rest is
sampled under the prompt, with the progress bar, previews, cancel and seeds of Text to Image.
"""

from __future__ import annotations

from comfy_api.latest import io

from .generation import (
    FRAMES_FIT, MAX_FRAMES, MAX_IMAGES, MAX_VIDEOS, PromptNode, fps_input, generation_callbacks, generation_inputs,
    generation_request, image_outputs, video_outputs,
)
from .model_cache import releases_after_use
from .schema import CATEGORY
from .vilau_latent import vilau_latent_codes


def _source_inputs(what: str) -> list[io.Input]:
    return [
        io.Image.Input(
            "image", optional=True,
            tooltip=f"The image(s) to {what}, e.g. from Load Image; encoded with the model's own preprocessing. "
            "Connect this or latent, not both.",
        ),
        io.Latent.Input(
            "latent", optional=True,
            tooltip=f"A VILA-U latent to {what} (from RQ-VAE Encode, Text to Image or another edit): its codes are "
            "used as they are. Connect this or image, not both.",
        ),
    ]


def _image_outputs() -> list[io.Output]:
    return [
        io.Image.Output(display_name="image", tooltip="The edited images, at the model's size."),
        io.Latent.Output(display_name="latent", tooltip="Their VILA-U latent (summed code embeddings plus codes)."),
    ]


def edit_source(vila, image, latent, node: str):
    """-> the source's codes (N, h, w, D)."""
    from ..vilau_backend.errors import InputError

    if (image is None) == (latent is None):
        state = "both are connected; keep one" if image is not None else "neither is connected"
        raise InputError(f"{node} edits an image or a VILA-U latent: {state}")
    if latent is not None:
        return vilau_latent_codes(vila, latent).cpu()
    return vila.encode_images(image).codes.cpu()


def edit_whole_sources(edit, setting, node: str, model, prompt: str, batch_size: int, image, latent, inputs: dict):
    """Variations and Continue Image: `batch_size` edits of each source through the backend edit
    `edit(vila, request, codes, setting(vila), **callbacks)` -> the node's image and latent."""
    request = generation_request(prompt, batch_size=batch_size, compile=model.compile, **inputs)
    vila = model.ready()
    codes = edit_source(vila, image, latent, node)
    result = edit(vila, request, codes, setting(vila), **generation_callbacks(vila))
    return image_outputs(vila, result)


def generation_inputs_for_edit(what: str) -> list[io.Input]:
    """Text to Image's inputs, with the batch counted per source image."""
    return generation_inputs(
        "image", MAX_IMAGES,
        batch_tooltip=f"How many {what} to make of each source image (image i of the outputs uses seed index i); "
        "memory grows with it.",
    )


class Inpaint(PromptNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..vilau_backend.tasks.editing import DEFAULT_FEATHER, DEFAULT_MASK_THRESHOLD

        return io.Schema(
            node_id="VILAU_Inpaint",
            display_name="VILA-U Inpaint",
            category=CATEGORY,
            description=(
                "Regenerates the masked part of an image under the prompt. VILA-U builds images as a grid of "
                "positions (16x16 for the 256 px model): every position outside the mask keeps its codes and the "
                "masked ones are sampled, each seeing everything before it. Paint the mask in Load Image's mask "
                "editor."
            ),
            inputs=[
                *generation_inputs_for_edit("inpaintings"),
                io.Mask.Input(
                    "mask",
                    tooltip="Where to regenerate: 1 (painted) = regenerate, 0 = keep. One mask for all images or "
                    "one per image; any size, mapped onto the image as the model's preprocessing maps the image.",
                ),
                io.Float.Input(
                    "mask_threshold", default=DEFAULT_MASK_THRESHOLD, min=0.01, max=1.0, step=0.01,
                    tooltip="A grid position is regenerated when at least this fraction of its pixels is masked "
                    "(0.5: half of it). Lower it to regenerate every position the mask touches.",
                ),
                io.Int.Input(
                    "grow_mask", default=0, min=0, max=16,
                    tooltip="Grow the regenerated region by this many grid positions in every direction "
                    "(one position is 16 px of the 256 px model, 14 px of the 384 px one).",
                ),
                io.Int.Input(
                    "feather", default=DEFAULT_FEATHER, min=0, max=64,
                    tooltip="With an image source: paste its pixels back outside the regenerated positions, "
                    "blended over this many pixels across the edge (0: a hard edge). Unused with a latent.",
                ),
                *_source_inputs("inpaint"),
            ],
            outputs=[
                *_image_outputs(),
                io.Mask.Output(
                    display_name="regenerated",
                    tooltip="The grid positions that were regenerated, as a mask at the model's size.",
                ),
            ],
        )

    @classmethod
    @releases_after_use
    def execute(
        cls, model, prompt: str, mask, mask_threshold: float, grow_mask: int, feather: int, batch_size: int,
        image=None, latent=None, **inputs,
    ) -> io.NodeOutput:
        """inputs: the other generation inputs (negative_prompt, cfg, seed, temperature, top_k, top_p)."""
        from ..vilau_backend.tasks.editing import inpaint

        request = generation_request(prompt, batch_size=batch_size, compile=model.compile, **inputs)
        vila = model.ready()
        codes = edit_source(vila, image, latent, "VILA-U Inpaint")
        result = inpaint(vila, request, codes, mask, images=image, threshold=mask_threshold, grow=grow_mask,
                         feather=feather, **generation_callbacks(vila))
        return image_outputs(vila, result, result.regenerated)


class VaryByDepth(PromptNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..vilau_backend.tasks.editing import DEFAULT_STRENGTH

        return io.Schema(
            node_id="VILAU_VaryByDepth",
            display_name="VILA-U Variations (by depth)",
            category=CATEGORY,
            description=(
                "Variations that keep the composition: every grid position of VILA-U's image is a stack of "
                "residual codes from coarse to fine; the coarse ones of the source are kept and the finer ones "
                "resampled under the prompt."
            ),
            inputs=[
                *generation_inputs_for_edit("variations"),
                io.Float.Input(
                    "strength", default=DEFAULT_STRENGTH, min=0.0, max=1.0, step=0.05,
                    tooltip="How much to change: the source keeps round((1 - strength) x depth) of its residual "
                    "depths at every position (depth 4 for the 256 px model, so steps of 0.25; 16 for the 384 px "
                    "one). 0 gives back the source, 1 a new image from the prompt.",
                ),
                *_source_inputs("vary"),
            ],
            outputs=_image_outputs(),
        )

    @classmethod
    @releases_after_use
    def execute(cls, model, prompt: str, strength: float, batch_size: int, image=None, latent=None, **inputs) -> io.NodeOutput:
        """inputs: the other generation inputs (negative_prompt, cfg, seed, temperature, top_k, top_p)."""
        from ..vilau_backend.tasks import editing

        def kept_depths(vila) -> int:
            return editing.depths_for_strength(strength, vila.config.quantizer.depth)

        return edit_whole_sources(
            editing.vary_by_depth, kept_depths, "VILA-U Variations", model, prompt, batch_size, image, latent, inputs
        )


class ContinueImage(PromptNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VILAU_ContinueImage",
            display_name="VILA-U Continue Image",
            category=CATEGORY,
            description=(
                "Keeps the top rows of an image and generates the rest downward under the prompt, as the model "
                "writes images: row after row. The kept rows are read in one pass, not generated again."
            ),
            inputs=[
                *generation_inputs_for_edit("continuations"),
                io.Int.Input(
                    "keep_rows", default=8, min=0, max=64,
                    tooltip="Grid rows to keep from the top (the 256 px model has 16 rows of 16 px, the 384 px "
                    "one 27 rows of 14 px); must not exceed the model's rows.",
                ),
                *_source_inputs("continue"),
            ],
            outputs=_image_outputs(),
        )

    @classmethod
    @releases_after_use
    def execute(cls, model, prompt: str, keep_rows: int, batch_size: int, image=None, latent=None, **inputs) -> io.NodeOutput:
        """inputs: the other generation inputs (negative_prompt, cfg, seed, temperature, top_k, top_p)."""
        from ..vilau_backend.tasks.editing import continue_downward

        return edit_whole_sources(
            continue_downward, lambda vila: keep_rows, "VILA-U Continue Image", model, prompt, batch_size, image,
            latent, inputs,
        )


class ExtendVideo(PromptNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = generation_inputs(
            "video", MAX_VIDEOS, batch_tooltip="How many continuations of the video to make (at most "
            f"{MAX_VIDEOS}); they follow one another in the outputs.",
        )
        return io.Schema(
            node_id="VILAU_ExtendVideo",
            display_name="VILA-U Extend Video",
            category=CATEGORY,
            description=(
                "Continues a video: the frames given are encoded and kept as the first frames, and more frames "
                "are generated after them under the prompt. The given frames are read in one pass."
            ),
            inputs=[
                *inputs,
                io.Int.Input(
                    "add_frames", default=4, min=1, max=MAX_FRAMES - 1,  # after at least one given frame
                    tooltip="Frames to generate after the given ones. Given plus added frames and the prompt must "
                    f"fit the model's context: {FRAMES_FIT}, in all.",
                ),
                fps_input(),
                io.Image.Input(
                    "frames", optional=True,
                    tooltip="The video to extend as an IMAGE batch, one image per frame in order (e.g. from VILA-U "
                    "Text to Video or a video loader). Connect one of frames, video or latent.",
                ),
                io.Video.Input(
                    "video", optional=True,
                    tooltip="The video to extend as a VIDEO (e.g. from Load Video); every frame is kept, so trim "
                    "long videos first. Connect one of frames, video or latent.",
                ),
                io.Latent.Input(
                    "latent", optional=True,
                    tooltip="The video's frames as a VILA-U latent, one entry per frame (e.g. Text to Video's "
                    "latent). Connect one of frames, video or latent.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="All frames, given then new, video after video."),
                io.Video.Output(display_name="video", tooltip="The frames as a VIDEO at the chosen fps."),
                io.Latent.Output(display_name="latent", tooltip="The frames' VILA-U latent, one entry per frame."),
            ],
        )

    @classmethod
    @releases_after_use
    def execute(
        cls, model, prompt: str, add_frames: int, fps: float, batch_size: int, frames=None, video=None, latent=None,
        **inputs,
    ) -> io.NodeOutput:
        """inputs: the other generation inputs (negative_prompt, cfg, seed, temperature, top_k, top_p)."""
        from ..vilau_backend.tasks.editing import extend_video

        request = generation_request(prompt, batch_size=batch_size, compile=model.compile, **inputs)
        vila = model.ready()
        given = _video_source_codes(vila, frames, video, latent)  # (Fg, h, w, D)
        total = given.shape[0] + add_frames
        result = extend_video(vila, request, given, total, **generation_callbacks(vila))
        return video_outputs(vila, result, fps)


def _video_source_codes(vila, frames, video, latent):
    from ..vilau_backend.errors import InputError

    connected = [name for name, value in (("frames", frames), ("video", video), ("latent", latent)) if value is not None]
    if len(connected) != 1:
        state = f"{' and '.join(connected)} are connected; keep one" if connected else "none is connected"
        raise InputError(f"VILA-U Extend Video takes the video as frames, a VIDEO or a latent: {state}")
    if latent is not None:
        return vilau_latent_codes(vila, latent).cpu()
    if video is not None:
        from ..vilau_backend.media.video import FrameChoice
        from .understanding import video_frames

        frames, _ = video_frames(video, None, FrameChoice())  # every frame, read as Video Q&A reads it
    return vila.encode_images(frames).codes.cpu()
