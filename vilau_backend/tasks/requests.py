"""What a user asks of each task, as one frozen, checked value: an image or video to generate
(`ImageRequest`), an edit of given codes (`EditRequest`), answers about images (`AnswerRequest`).

Each request checks what it can without a model when it is made, so a bad value is refused
before anything runs, with the same message wherever it came from (a node, the CLI, a job);
the task functions then check what needs the model (context length, the model's code depth).
Progress and cancel callbacks are not part of a request: they are how the caller watches a run.

The task functions also take a prompt or question with the request's fields as keywords
(`generate_images(model, "a fox", seed=3)`): `image_request` / `answer_request` turn such a call
into the request, so both ways of calling reach the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..decoding.answer_loop import DEFAULT_MAX_NEW_TOKENS, check_max_new_tokens
from ..decoding.prompts import DEFAULT_NEGATIVE_PROMPT, SYSTEM_PROMPT, refuse_image_placeholder
from ..decoding.token_choice import TextSampling
from ..errors import InputError, require_finite

# answers generated together in one pass: memory grows with it (one KV cache row per answer)
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class ImageSampling:
    """Depth-code sampling; defaults are the values the original hard-codes.

    top_k=1 (or temperature 0) is exact greedy decoding."""

    cfg: float = 3.0
    temperature: float = 1.0
    top_k: int = 900
    top_p: float = 0.96

    def __post_init__(self) -> None:
        require_finite(cfg=self.cfg, temperature=self.temperature, top_p=self.top_p)
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


def empty_prompt_problem(prompt: str | None) -> str | None:
    """What is wrong with an empty generation prompt, as the backend and the nodes' queue-time check say it."""
    if prompt is None or not prompt.strip():
        return "the prompt is empty: describe the image or video to generate"
    return None


def empty_question_problem(question: str | None) -> str | None:
    """What is wrong with an empty question, as the backend and the nodes' queue-time check say it."""
    if question is None or not question.strip():
        return "the question is empty: ask something, e.g. 'Describe the image in detail.'"
    return None


@dataclass(frozen=True)
class ImageRequest:
    """`num_images` images (frames None) or videos of `frames` frames from a prompt; in an edit
    (tasks/editing.py), `num_images` edits of each source.

    compile: run the compiled step (None: on CUDA only)."""

    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    num_images: int = 1
    frames: int | None = None
    sampling: ImageSampling = ImageSampling()
    seed: int = 0
    compile: bool | None = None

    def __post_init__(self) -> None:
        problem = empty_prompt_problem(self.prompt)
        if problem:
            raise InputError(problem)
        refuse_image_placeholder("prompt", self.prompt)
        refuse_image_placeholder("negative prompt", self.negative_prompt)
        if self.num_images < 1:
            raise InputError(f"num_images must be at least 1, got {self.num_images}")
        if self.frames is not None and self.frames < 1:
            raise InputError(f"frames must be at least 1, got {self.frames}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class EditRequest:
    """A generation in which the codes `keep` marks are the given ones and the rest are sampled.

    given_codes and keep: (B, P, D), or shaped as the generated codes; B is the generation's
    num_images, the whole batch (tasks/editing.py: edits_of_sources makes it from sources and
    edits per source). Their sizes against the model are checked by the run (tasks/generate.py)."""

    generation: ImageRequest
    given_codes: torch.Tensor = field(repr=False)
    keep: torch.Tensor = field(repr=False)

    def __post_init__(self) -> None:
        if self.given_codes is None or self.keep is None:
            raise InputError("editing needs both given_codes and keep (which of the given codes to keep)")
        if self.keep.dtype != torch.bool:
            raise InputError(f"keep must be a bool tensor (True = keep the given code), got {self.keep.dtype}")


@dataclass(frozen=True)
class AnswerRequest:
    """A question about images or a video.

    batch: every image gets its own answer (up to `batch_size` generated together) instead of one
    answer about all of them. Each answer samples from its own generator seeded with `seed`."""

    question: str
    system: str = SYSTEM_PROMPT
    sampling: TextSampling = TextSampling()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = 0
    batch: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    compile: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.question, str):
            raise InputError(f"the question must be text, got {type(self.question).__name__}")
        problem = empty_question_problem(self.question)
        if problem:
            raise InputError(problem)
        refuse_image_placeholder("question", self.question)
        refuse_image_placeholder("system prompt", self.system)
        check_max_new_tokens(self.max_new_tokens)
        if self.batch_size < 1:
            raise InputError(f"batch_size (answers generated together) must be 1 or more, got {self.batch_size}")
        if not 0 <= self.seed < 2**64:
            raise InputError(f"seed must lie in 0..2**64-1, got {self.seed}")


def image_request(request: ImageRequest | str | None, fields: dict) -> ImageRequest:
    """The request a task was given, or the one a prompt and the request's fields as keywords make
    (request None: the prompt too is a keyword)."""
    return _request(ImageRequest, request, fields)


def answer_request(request: AnswerRequest | str | None, fields: dict) -> AnswerRequest:
    """The request a task was given, or the one a question and the request's fields as keywords make."""
    return _request(AnswerRequest, request, fields)


def _request(kind: type, request, fields: dict):
    if isinstance(request, kind):
        if fields:
            raise TypeError(f"pass a {kind.__name__} or its fields as keywords, not both (got {', '.join(fields)})")
        return request
    return kind(**fields) if request is None else kind(request, **fields)
