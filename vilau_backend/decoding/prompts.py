"""Prompts exactly as the original VILA-U builds them (the tokenizer is in checkpoint/tokenizer.py).

Prompt building follows ``vila_u/conversation.py`` (vicuna_v1),
``vila_u/utils/media.py`` (``<image>`` slots), ``vila_u/utils/tokenizer.py``
(start tokens) and ``vila_u/mm_utils.py`` (``tokenizer_image_token``).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..checkpoint.tokenizer import IM_START, IMAGE_PLACEHOLDER, VI_START, VilaTokenizer

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# as the original generate_image_content / generate_video_content
DEFAULT_NEGATIVE_PROMPT = " "
PADDING_ID = 0  # the original pads CFG rows with zeros (= <unk>), not with pad_token_id


def refuse_image_placeholder(name: str, text: str) -> None:
    """Refuse a text input holding VILA-U's image slot: the slot would have no image to fill it (the
    original would embed id -200 and fail inside the LLM). `name`: the input, as the user knows it.
    The requests (tasks/requests.py) ask this of every text when they are made."""
    if IMAGE_PLACEHOLDER in text:
        raise InputError(
            f"the {name} contains '{IMAGE_PLACEHOLDER}', which VILA-U reserves for image inputs; remove it from the "
            f"{name}"
        )


def refuse_text_that_cannot_fit(tokenizer: VilaTokenizer, texts: dict[str, str], context_length: int) -> None:
    """Refuse, before tokenizing, a text longer than any `context_length` tokens can hold: tokenizing
    millions of characters takes seconds in which Cancel is not read. `texts`: {input name: text}."""
    limit = context_length * tokenizer.longest_piece
    for name, text in texts.items():
        if len(text) > limit:
            raise InputError(
                f"the {name} is {len(text):,} characters long, more than the model's context of {context_length} "
                f"tokens can hold ({limit:,} characters at most, {tokenizer.longest_piece} per token); shorten the "
                f"{name}"
            )


def conversation_prompt(message: str, system: str = SYSTEM_PROMPT) -> str:
    """One vicuna_v1 user turn and the open assistant turn (``conv.get_prompt()``).

    `system` replaces the template's system message (the original's is SYSTEM_PROMPT)."""
    refuse_image_placeholder("system prompt", system)
    message = message.strip()
    # as the original (SeparatorStyle.TWO): an empty turn renders as "USER:",
    # with neither a space nor the separator; the system message is followed by
    # the separator " " even when empty
    user_turn = f"USER: {message} " if message else "USER:"
    return f"{system} {user_turn}ASSISTANT:"


def understanding_prompt(query: str, n_images: int = 1, system: str = SYSTEM_PROMPT) -> str:
    """Prompt for describing images; a video brings one image slot per frame."""
    if n_images < 0:
        raise InputError(f"n_images must be 0 or more, got {n_images}")
    # as extract_media: the media come first, one "<image>\n" each; the whole
    # message is stripped afterwards
    return conversation_prompt(f"{IMAGE_PLACEHOLDER}\n" * n_images + query, system)


def generation_prompt(text: str, video: bool = False) -> str:
    """Prompt for image (``<im_start>``) or video (``<vi_start>``) generation."""
    return f"{conversation_prompt(text)} {VI_START if video else IM_START}"


def cfg_batch(
    tokenizer: VilaTokenizer,
    prompt: str,
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    n: int = 1,
    video: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded classifier-free-guidance batch of ``generate_image_content``.

    Returns ``input_ids`` (R, T) long and ``attention_mask`` (R, T) bool with
    R = 2n: n conditional rows, then n unconditional rows.
    """
    if n < 1:
        raise InputError(f"the number of images to generate must be 1 or more, got {n}")
    refuse_image_placeholder("prompt", prompt)
    refuse_image_placeholder("negative prompt", negative_prompt)
    conditional = tokenizer.tokenize_with_image_slots(generation_prompt(prompt, video))
    unconditional = tokenizer.tokenize_with_image_slots(generation_prompt(negative_prompt, video))
    rows = [conditional] * n + [unconditional] * n
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PADDING_ID, dtype=torch.long)  # (R, T)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)  # (R, T)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, length - len(row) :] = True
    return input_ids, attention_mask


# ---- question presets ------------------------------------------------------------------

CUSTOM_QUESTION = "custom"
# The questions people ask captioners most (short and detailed captions, prompts for an image
# generator, tags, what is in the picture or the video), worded for VILA-U's vicuna_v1 chat;
# "{media}" becomes "image" or "video". Presets that only make sense for one kind say which.
QUESTION_PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "short caption": ("Describe the {media} in one short sentence.", ("image", "video")),
    "detailed caption": ("Describe the {media} in detail.", ("image", "video")),
    "very detailed caption": (
        "Describe the {media} in as much detail as you can: the subjects and what they look like, what they "
        "are doing, the setting, the colors, the lighting and the composition.", ("image", "video")),
    "Stable Diffusion prompt": (
        "Write a prompt for an image generator that would recreate this image: one line of short, "
        "comma-separated phrases, the main subject first, then the setting, the style, the lighting and "
        "the colors. Answer with the prompt only.", ("image",)),
    "comma-separated tags": (
        "List what is in this {media} as comma-separated tags: objects, people, animals, colors, setting and "
        "style, the most important first. Answer with the tags only.", ("image", "video")),
    "main objects": ("What are the main objects in the {media}? Answer with a short list.", ("image", "video")),
    "visible text (OCR)": (
        "What text is written in the image? Write it out exactly; answer 'none' if there is no text.", ("image",)),
    "art style": ("What is the style or medium of this {media} (photo, painting, drawing, 3D render, ...)? "
                  "Answer in a few words.", ("image", "video")),
    "what happens": ("What happens in the video, from beginning to end?", ("video",)),
}


def question_presets(media: str) -> list[str]:
    """The preset choices for questions about an image or a video; 'custom' (the question as typed) first."""
    return [CUSTOM_QUESTION] + [name for name, (_, kinds) in QUESTION_PRESETS.items() if media in kinds]


def preset_question(preset: str, question: str, media: str) -> str:
    """The question to ask: `question` as typed for 'custom', otherwise the preset's own."""
    if preset == CUSTOM_QUESTION:
        return question
    if preset not in question_presets(media):
        raise InputError(f"unknown question preset {preset!r} for questions about {media}s; choose one of: "
                         f"{', '.join(question_presets(media))}")
    return QUESTION_PRESETS[preset][0].format(media=media)
