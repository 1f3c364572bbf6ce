"""VILA-U Text to Image and Text to Video: the autoregressive code loop, one grid position at a time."""

from __future__ import annotations

from fractions import Fraction

from comfy_api.latest import io

from ..vilau_backend.checkpoint.published import PUBLISHED_256, PUBLISHED_384, most_published_video_frames
from .model_cache import releases_after_use
from .progress import PositionProgress, announce_compiling, executing_node_id
from .schema import CATEGORY, advanced, model_input, seed_input
from .vilau_latent import make_vilau_latent

MAX_IMAGES = 16
MAX_VIDEOS = 4
# frames of one video (Text to Video, and given plus added in Extend Video): as many as the 256 px model's
# context holds; the 384 px model holds fewer, and the backend refuses what does not fit
MAX_FRAMES = most_published_video_frames(PUBLISHED_256)
FRAMES_FIT = (f"up to {MAX_FRAMES} frames for the 256 px model, {most_published_video_frames(PUBLISHED_384)} for the "
              "384 px one")


def generation_inputs(what: str, max_batch: int, batch_tooltip: str | None = None) -> list[io.Input]:
    """Prompt, guidance, seed, batch and depth-code sampling; defaults are the backend's (the original's)."""
    from ..vilau_backend.tasks.generate import ImageSampling

    defaults = ImageSampling()
    return [
        model_input(),
        io.String.Input(
            "prompt", multiline=True, default="", tooltip=f"What the {what} should show. Must not be empty."
        ),
        io.String.Input(
            "negative_prompt", multiline=True, default="",
            tooltip="What to steer away from, through classifier-free guidance. Empty: the original's "
            "unconditional prompt (a single space).",
        ),
        io.Float.Input(
            "cfg", default=defaults.cfg, min=0.0, max=30.0, step=0.1, round=0.01,
            tooltip="Classifier-free guidance scale: how strongly the prompt (against the negative prompt) "
            "steers every code; 1 is no guidance; the original uses 3.",
        ),
        seed_input(f"Seed of the code sampling. {what.capitalize()} i of a batch is the same whatever the batch size."),
        io.Int.Input(
            "batch_size", default=1, min=1, max=max_batch,
            tooltip=batch_tooltip or f"How many {what}s to generate at once (at most {max_batch}); memory grows with it.",
        ),
        advanced(
            io.Float.Input,
            "temperature", default=defaults.temperature, min=0.0, max=5.0, step=0.01,
            tooltip="Advanced: sampling temperature of the depth codes; 0 picks the most likely code (greedy).",
        ),
        advanced(
            io.Int.Input,
            "top_k", default=defaults.top_k, min=0, max=1_000_000,
            tooltip="Advanced: draw each code from the k most likely; 0 turns the filter off.",
        ),
        advanced(
            io.Float.Input,
            "top_p", default=defaults.top_p, min=0.01, max=1.0, step=0.01,
            tooltip="Advanced: draw each code from the most likely codes that together reach this probability; "
            "1 turns the filter off.",
        ),
    ]


def fps_input() -> io.Float.Input:
    """Text to Video's and Extend Video's frame rate."""
    from ..vilau_backend.media.video import DEFAULT_FPS

    return io.Float.Input(
        "fps", default=DEFAULT_FPS, min=1.0, max=120.0, step=1.0,
        tooltip="Frame rate stored in the VIDEO output; it does not change what is generated.",
    )


def check_prompt(prompt: str | None) -> bool | str:
    from ..vilau_backend.tasks.generate import empty_prompt_problem

    # None: the prompt comes from a link, known only when the node runs (the backend checks it then)
    return True if prompt is None else empty_prompt_problem(prompt) or True


class PromptNode(io.ComfyNode):
    """A node that generates from a prompt (Text to Image/Video and the edits): an empty prompt is
    refused when the workflow is queued, before anything runs."""

    @classmethod
    def validate_inputs(cls, prompt: str | None = None) -> bool | str:
        return check_prompt(prompt)


def generation_request(
    prompt: str, *, negative_prompt: str, cfg: float, seed: int, batch_size: int, temperature: float, top_k: int,
    top_p: float, compile: bool | None = None, frames: int | None = None,
):
    """The node's generation inputs -> the backend's ImageRequest (`compile`: the loader's choice for this run)."""
    from ..vilau_backend.decoding.prompts import DEFAULT_NEGATIVE_PROMPT
    from ..vilau_backend.tasks.requests import ImageRequest, ImageSampling

    return ImageRequest(
        prompt=prompt,
        negative_prompt=negative_prompt if negative_prompt.strip() else DEFAULT_NEGATIVE_PROMPT,
        num_images=batch_size,
        frames=frames,
        sampling=ImageSampling(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p),
        seed=seed,
        compile=compile,
    )


def generation_callbacks(model, node_id: str | None = None) -> dict:
    """The progress bar with previews and the "compiling…" notice of node `node_id` (None: the executing
    node), as the backend's on_position and on_compile."""
    node_id = node_id if node_id is not None else executing_node_id()
    return dict(
        on_position=PositionProgress(model, node_id),
        on_compile=lambda notice=None: announce_compiling(node_id, notice),
    )


def image_outputs(vila, result, *more) -> io.NodeOutput:
    """Generated images (B, H, W, 3) -> the IMAGE and LATENT outputs, then `more` outputs."""
    return io.NodeOutput(result.images, make_vilau_latent(vila, result.features, result.codes), *more)


def video_outputs(vila, result, fps: float) -> io.NodeOutput:
    """Generated videos (B, F, H, W, 3) -> the frames as one IMAGE batch, a VIDEO at `fps` and the
    LATENT, one entry per frame, video after video."""
    from comfy_api.latest import InputImpl, Types

    images = result.images.flatten(0, 1)  # (B*F, H, W, 3)
    components = Types.VideoComponents(images=images, audio=None, frame_rate=Fraction(fps))
    latent = make_vilau_latent(vila, result.features.flatten(0, 1), result.codes.flatten(0, 1))
    return io.NodeOutput(images, InputImpl.VideoFromComponents(components), latent)


class TextToImage(PromptNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VILAU_TextToImage",
            display_name="VILA-U Text to Image",
            category=CATEGORY,
            description=(
                "Generates images from a prompt, one grid position after another (256 positions for the 256 px "
                "model), with a preview of the rows done so far. Outputs the images and their RQ-VAE latent "
                "(decodable with VILA-U RQ-VAE Decode, also after core latent nodes)."
            ),
            inputs=generation_inputs("image", MAX_IMAGES),
            hidden=[io.Hidden.unique_id],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The generated images, at the model's size."),
                io.Latent.Output(
                    display_name="latent",
                    tooltip="Their RQ-VAE latent: samples = summed code embeddings (B, C, h, w), plus the codes.",
                ),
            ],
        )

    @classmethod
    @releases_after_use
    def execute(cls, model, prompt: str, **inputs) -> io.NodeOutput:
        """inputs: the other generation inputs (negative_prompt, cfg, seed, batch_size, temperature, top_k, top_p)."""
        from ..vilau_backend.tasks.generate import generate_images

        request = generation_request(prompt, compile=model.compile, **inputs)
        vila = model.ready()
        result = generate_images(vila, request, **generation_callbacks(vila, cls.hidden.unique_id))
        return image_outputs(vila, result)


class TextToVideo(PromptNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..vilau_backend.tasks.generate import DEFAULT_VIDEO_FRAMES

        return io.Schema(
            node_id="VILAU_TextToVideo",
            display_name="VILA-U Text to Video",
            category=CATEGORY,
            description=(
                "Generates short videos from a prompt, frame after frame, with a preview of the frame in progress. "
                "Outputs the frames (an IMAGE batch), a VIDEO (for Save Video) and the frames' RQ-VAE latent. "
                "With a batch, the videos follow one another in all three outputs."
            ),
            inputs=[
                *generation_inputs("video", MAX_VIDEOS),
                io.Int.Input(
                    "frames", default=DEFAULT_VIDEO_FRAMES, min=1, max=MAX_FRAMES,
                    tooltip=f"Frames per video (the original makes {DEFAULT_VIDEO_FRAMES}). Prompt and frames must fit the model's "
                    f"context: {FRAMES_FIT}.",
                ),
                fps_input(),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="All frames, video after video (batch x frames)."),
                io.Video.Output(display_name="video", tooltip="The frames as a VIDEO at the chosen fps."),
                io.Latent.Output(display_name="latent", tooltip="The frames' RQ-VAE latent, one entry per frame."),
            ],
        )

    @classmethod
    @releases_after_use
    def execute(cls, model, prompt: str, frames: int, fps: float, **inputs) -> io.NodeOutput:
        """inputs: the other generation inputs, as for Text to Image."""
        from ..vilau_backend.tasks.generate import generate_video

        request = generation_request(prompt, frames=frames, compile=model.compile, **inputs)
        vila = model.ready()
        result = generate_video(vila, request, **generation_callbacks(vila, cls.hidden.unique_id))
        return video_outputs(vila, result, fps)
