"""VILA-U Image Q&A and Video Q&A: answers shown on the node while they are generated."""

from __future__ import annotations

from comfy_api.latest import io

from ..vilau_backend.decoding.prompts import CUSTOM_QUESTION, SYSTEM_PROMPT, question_presets
from ..vilau_backend.tasks.understand import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, TextSampling
from .model_cache import releases_after_use
from .progress import AnswerProgress
from .schema import CATEGORY, advanced, check_combo, model_input, seed_input

EACH_IMAGE = "one answer per image"
ALL_IMAGES = "one answer about all images"
MAX_NEW_TOKENS = 4096
MAX_BATCH_SIZE = 64
MAX_VIDEO_FRAMES = 256
EXTRA_IMAGE_INPUTS = ("image_2", "image_3", "image_4")  # fixed optional sockets: ComfyUI 0.3.75 has no Autogrow


def question_input(default: str, what: str) -> io.String.Input:
    return io.String.Input(
        "question", multiline=True, default=default, tooltip=f"What to ask about the {what}. Must not be empty."
    )


def preset_input(media: str) -> io.Combo.Input:
    # optional and last: workflows and API graphs saved before it existed keep their question
    return io.Combo.Input(
        "preset", options=question_presets(media), default=CUSTOM_QUESTION, optional=True,
        tooltip=f"A ready-made question (a short or detailed caption, tags, ...); '{CUSTOM_QUESTION}' asks the "
        "question as typed in the question box, which the other choices leave unused.",
    )


def answer_inputs() -> list[io.Input]:
    """Seed, answer length and sampling; the defaults are the backend's (the published checkpoints'
    generation_config)."""
    defaults = TextSampling()
    return [
        seed_input("Seed of the token sampling. Same seed, same answer; unused with greedy decoding."),
        io.Int.Input(
            "max_new_tokens", default=DEFAULT_MAX_NEW_TOKENS, min=1, max=MAX_NEW_TOKENS,
            tooltip="The longest answer, in tokens; the answer usually ends earlier, when the model says it is done.",
        ),
        io.Boolean.Input(
            "do_sample", default=defaults.do_sample, label_on="sample", label_off="greedy",
            tooltip="sample: draw each token (temperature, top_k, top_p apply), as the original's defaults. "
            "greedy: always the most likely token, the same answer whatever the seed.",
        ),
        advanced(
            io.Float.Input,
            "temperature", default=defaults.temperature, min=0.01, max=5.0, step=0.01,
            tooltip="Sampling only (advanced): below 1 sharper and more predictable, above 1 more varied.",
        ),
        advanced(
            io.Int.Input,
            "top_k", default=defaults.top_k, min=0, max=100000,
            tooltip="Sampling only (advanced): draw from the k most likely tokens; 0 turns the filter off.",
        ),
        advanced(
            io.Float.Input,
            "top_p", default=defaults.top_p, min=0.0, max=1.0, step=0.01,
            tooltip="Sampling only (advanced): draw from the most likely tokens that together reach this "
            "probability; 1 turns the filter off.",
        ),
        advanced(
            io.Float.Input,
            "repetition_penalty", default=defaults.repetition_penalty, min=0.01, max=5.0, step=0.01,
            tooltip="Advanced: above 1 discourages repeating tokens already generated (sampling and greedy); "
            "1 turns it off.",
        ),
        system_prompt_input(),
    ]


def system_prompt_input() -> io.String.Input:
    # optional: graphs saved before this input existed still run, with the original's message
    return advanced(
        io.String.Input,
        "system_prompt", multiline=True, default=SYSTEM_PROMPT, optional=True,
        tooltip="Advanced: the conversation's system message, before the question. The default is the original "
        "VILA-U's (vicuna_v1); e.g. ask for short, comma-separated captions here.",
    )


def answer_output(tooltip: str, is_list: bool = False) -> io.String.Output:
    return io.String.Output(display_name="answer", tooltip=tooltip, is_output_list=is_list)


def text_sampling(do_sample: bool, temperature: float, top_k: int, top_p: float, repetition_penalty: float):
    from ..vilau_backend.tasks.understand import TextSampling

    return TextSampling(
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty
    )


def check_question(question: str | None, preset: str | None = None) -> bool | str:
    if preset not in (None, CUSTOM_QUESTION):
        return True  # the preset's question is asked; the box may be empty
    from ..vilau_backend.tasks.requests import empty_question_problem

    # None: the question comes from a link, known only when the node runs (the request checks it then)
    return True if question is None else empty_question_problem(question) or True


class QuestionNode(io.ComfyNode):
    """A node that answers a question (Image Q&A, Video Q&A, Caption Folder): an empty question is
    refused when the workflow is queued, before anything runs."""

    @classmethod
    def validate_inputs(cls, question: str | None = None, preset: str | None = None) -> bool | str:
        return check_question(question, preset)


class ImageQA(QuestionNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VILAU_ImageQA",
            display_name="VILA-U Image Q&A",
            category=CATEGORY,
            description=(
                "Answers a question about images (captions, VQA). For a batch of images it answers each image on "
                "its own by default, giving a list of answers: nodes after it run once per answer (as with "
                "captioning/tagging nodes). The answer appears on the node as it is written."
            ),
            inputs=[
                model_input(),
                io.Image.Input("image", tooltip="The image(s) to ask about; any size, the model resizes them."),
                question_input("Describe the image in detail.", "image"),
                io.Combo.Input(
                    "batch_mode", options=[EACH_IMAGE, ALL_IMAGES], default=EACH_IMAGE,
                    tooltip=f"With several images: '{EACH_IMAGE}' answers each image separately (a list, in "
                    f"batch order); '{ALL_IMAGES}' puts all of them in one prompt, in order, for one answer "
                    "(to compare images).",
                ),
                *answer_inputs(),
                advanced(
                    io.Int.Input,
                    "batch_size", default=DEFAULT_BATCH_SIZE, min=1, max=MAX_BATCH_SIZE, optional=True,
                    tooltip=f"Advanced, with '{EACH_IMAGE}': how many answers are generated together in one "
                    "pass. Larger is faster per answer and takes more memory (one KV cache row per answer).",
                ),
                *[
                    io.Image.Input(
                        name, optional=True,
                        tooltip=f"More images for the same question ({name.replace('_', ' ')} of the prompt). When "
                        "any of these is connected the node asks ONE question about all images: image's batch "
                        "first, then image_2, image_3, ... in order, each in its own image slot of the prompt.",
                    )
                    for name in EXTRA_IMAGE_INPUTS
                ],
                preset_input("image"),
            ],
            outputs=[answer_output("The answers: one per image, or one for all images.", is_list=True)],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    @releases_after_use
    def execute(
        cls, model, image, question: str, batch_mode: str, seed: int, max_new_tokens: int, do_sample: bool,
        temperature: float, top_k: int, top_p: float, repetition_penalty: float,
        system_prompt: str = SYSTEM_PROMPT, batch_size: int = DEFAULT_BATCH_SIZE, preset: str = CUSTOM_QUESTION,
        **extra_images,
    ) -> io.NodeOutput:
        from ..vilau_backend.decoding.prompts import preset_question
        from ..vilau_backend.tasks.understand import AnswerRequest, describe_images

        check_combo("batch_mode", batch_mode, [EACH_IMAGE, ALL_IMAGES])
        more = [extra_images[name] for name in EXTRA_IMAGE_INPUTS if extra_images.get(name) is not None]
        each = batch_mode == EACH_IMAGE and not more
        progress = AnswerProgress(cls.hidden.unique_id, image.shape[0] if each else 1, max_new_tokens, batch_size)
        request = AnswerRequest(
            question=preset_question(preset, question, "image"), system=system_prompt,
            sampling=text_sampling(do_sample, temperature, top_k, top_p, repetition_penalty),
            max_new_tokens=max_new_tokens, seed=seed, batch=each, batch_size=batch_size, compile=model.compile,
        )
        streams = dict(on_answers=progress.on_answers) if each else dict(on_token=progress)
        answers = describe_images(model.ready(), [image, *more], request, on_compile=progress.on_compile, **streams)
        texts = [answer.text for answer in answers]
        progress.done(texts)
        return io.NodeOutput(texts, ui={"text": texts})


class VideoQA(QuestionNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VILAU_VideoQA",
            display_name="VILA-U Video Q&A",
            category=CATEGORY,
            description=(
                "Answers a question about a video, given as frames (an IMAGE batch) or as a VIDEO. By default the "
                "model looks at evenly spaced frames of the whole video (8 for the published models), as the "
                "original; frame_count, frame_method and the start/end window choose others. The answer appears "
                "on the node as it is written."
            ),
            inputs=[
                model_input(),
                question_input("Describe the video in detail.", "video"),
                io.Image.Input(
                    "frames", optional=True,
                    tooltip="The video as an IMAGE batch, one image per frame in order (e.g. from a video loader "
                    "or VILA-U Text to Video). Connect this or video, not both.",
                ),
                io.Video.Input(
                    "video", optional=True,
                    tooltip="The video as a VIDEO (e.g. from Load Video); only the frames the model uses are "
                    "decoded. Connect this or frames, not both.",
                ),
                *answer_inputs(),
                *frame_choice_inputs(),
                preset_input("video"),
            ],
            outputs=[answer_output("The answer about the video.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    @releases_after_use
    def execute(
        cls, model, question: str, seed: int, max_new_tokens: int, do_sample: bool, temperature: float,
        top_k: int, top_p: float, repetition_penalty: float, system_prompt: str = SYSTEM_PROMPT, frames=None,
        video=None, preset: str = CUSTOM_QUESTION, **frame_options,
    ) -> io.NodeOutput:
        from ..vilau_backend.errors import InputError
        from ..vilau_backend.decoding.prompts import preset_question
        from ..vilau_backend.tasks.understand import AnswerRequest, describe_video

        if (frames is None) == (video is None):
            state = "both are connected; keep one" if frames is not None else "neither is connected"
            raise InputError(f"VILA-U Video Q&A takes the video as frames (an IMAGE batch) or as a VIDEO: {state}")
        choice = frame_choice(**frame_options)
        request = AnswerRequest(
            question=preset_question(preset, question, "video"), system=system_prompt,
            sampling=text_sampling(do_sample, temperature, top_k, top_p, repetition_penalty),
            max_new_tokens=max_new_tokens, seed=seed, compile=model.compile,
        )
        vila = model.ready()  # after every input is checked: a bad value waits for no model load
        if video is not None:
            frames, choice = video_frames(video, vila.config.num_video_frames, choice)
        progress = AnswerProgress(cls.hidden.unique_id, 1, max_new_tokens)
        answer = describe_video(vila, frames, request, choice=choice, on_token=progress, on_compile=progress.on_compile)
        progress.done([answer.text])
        return io.NodeOutput(answer.text, ui={"text": [answer.text]})


def frame_choice_inputs() -> list[io.Input]:
    """How Video Q&A picks frames; optional, so graphs saved before these inputs existed still run,
    and the defaults are the backend's FrameChoice(): the original's frames."""
    from ..vilau_backend.media.video import FRAME_METHODS, FrameChoice

    defaults = FrameChoice()
    return [
        io.Int.Input(
            "frame_count", default=defaults.count or 0, min=0, max=MAX_VIDEO_FRAMES, optional=True,
            tooltip="How many frames the model looks at; 0: the model's own number (8 for the published "
            "models), as the original. Each frame takes one image's worth of the context.",
        ),
        io.Combo.Input(
            "frame_method", options=list(FRAME_METHODS), default=defaults.method, optional=True,
            tooltip="How the frames are picked from the window: uniform: spread evenly, as the original; "
            "first: the first frames, one after another; every: every frame_step-th frame from the start.",
        ),
        advanced(
            io.Int.Input,
            "frame_step", default=defaults.step, min=1, max=10000, optional=True,
            tooltip="Advanced, with frame_method 'every': take every k-th frame (1: every frame).",
        ),
        advanced(
            io.Int.Input,
            "start_frame", default=defaults.start, min=0, max=10**7, optional=True,
            tooltip="Advanced: the first frame of the window the frames are picked from (0: the video's first).",
        ),
        advanced(
            io.Int.Input,
            "end_frame", default=-1 if defaults.end is None else defaults.end, min=-1, max=10**7, optional=True,
            tooltip="Advanced: the last frame of the window, included; -1: the video's last frame.",
        ),
    ]


FRAME_CHOICE_FIELDS = {  # Video Q&A's frame inputs -> FrameChoice's fields
    "frame_count": "count", "frame_method": "method", "frame_step": "step", "start_frame": "start", "end_frame": "end",
}


def frame_choice(**inputs):
    """The frame inputs given -> FrameChoice; an input left out (a graph saved before it existed) keeps
    FrameChoice's own default, and the widgets' 0 count and -1 end are its None."""
    from ..vilau_backend.media.video import FrameChoice

    fields = {FRAME_CHOICE_FIELDS[name]: value for name, value in inputs.items()}
    if fields.get("count") == 0:
        fields["count"] = None
    if fields.get("end", 0) < 0:
        fields["end"] = None
    return FrameChoice(**fields)


def video_frames(video, num_frames: int | None, choice):
    """A VIDEO's frames (F, H, W, 3) and the frame choice still to apply to them: from an untrimmed,
    uncropped file only the chosen frames are decoded (None left to apply); other videos give all
    their frames. Video Q&A and Extend Video read through this, so a file that is not a video, has
    no video stream or no frames gets one explanation in both."""
    from comfy_api.latest import InputImpl

    from ..vilau_backend.errors import InputError
    from ..vilau_backend.media.video import read_video
    from .video_source import whole_file_path

    path = whole_file_path(video, InputImpl.VideoFromFile)
    if path is not None:
        return read_video(path, num_frames, choice=choice).frames, None
    try:
        images = video.get_components().images
    except Exception as error:  # PyAV and the VIDEO's own code raise many kinds for a damaged file
        raise InputError(f"cannot read the VIDEO's frames ({type(error).__name__}: {error}); give a video file "
                         "with a video stream and at least one frame") from error
    if images.shape[0] == 0:
        raise InputError("the video has no frames")
    return images, choice
