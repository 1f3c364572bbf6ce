"""The published VILA-U checkpoints: their hub ids, the files they hold, and what their configs say
that limits need before any model is loaded (the nodes' widget ranges)."""

from __future__ import annotations

PUBLISHED_256 = "mit-han-lab/vila-u-7b-256"
PUBLISHED_384 = "mit-han-lab/vila-u-7b-384"
PUBLISHED = (PUBLISHED_256, PUBLISHED_384)
# what a complete model folder holds, for the people who put one together by hand
FILES_HINT = (
    "config.json at the top; llm/ with config.json, generation_config.json, the tokenizer files "
    "(tokenizer.model, tokenizer_config.json, special_tokens_map.json) and the *.safetensors weights with "
    "their model.safetensors.index.json; vision_tower/ with config.json, preprocessor_config.json and its "
    "*.safetensors; mm_projector/ with config.json and its *.safetensors"
)

# both llm/config.json: 4096 RoPE positions stretched by the linear factor 2 (checkpoint/config.py: context_length)
PUBLISHED_CONTEXT = 8192
# one frame's grid: 256 px in 16 px patches, 384 px in 14 px patches
PUBLISHED_GRIDS = {PUBLISHED_256: (16, 16), PUBLISHED_384: (27, 27)}


def most_video_frames(context_length: int, grid: tuple[int, int]) -> int:
    """The most frames a generated video can have: every frame takes h*w positions of the context,
    after a prompt of at least one token (tasks/generate.py refuses a run that does not fit)."""
    h, w = grid
    return (context_length - 1) // (h * w)


def most_published_video_frames(repo_id: str) -> int:
    """most_video_frames of a published model: 31 for the 256 px one, 11 for the 384 px one."""
    return most_video_frames(PUBLISHED_CONTEXT, PUBLISHED_GRIDS[repo_id])
