"""Prompts and token ids exactly as the original VILA-U builds them.

The original tokenized with transformers 4.36's *slow* sentencepiece
``LlamaTokenizer`` (``legacy=False``, ``add_prefix_space=True``, VILA's
replaced ``tokenization_llama.py``). Later transformers versions changed that
tokenizer (5.x encodes ``" "`` as ``[bos, 905]`` where the original gave
``[bos, 264]``), so :class:`VilaTokenizer` drives the ``sentencepiece`` model
itself and repeats the slow tokenizer's steps; the ids then do not depend on
the installed transformers.

Prompt building follows ``vila_u/conversation.py`` (vicuna_v1),
``vila_u/utils/media.py`` (``<image>`` slots), ``vila_u/utils/tokenizer.py``
(start tokens) and ``vila_u/mm_utils.py`` (``tokenizer_image_token``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from .errors import CheckpointError, InputError

IMAGE_TOKEN_INDEX = -200  # id of an image slot in input_ids; spliced out before the LLM
IMAGE_PLACEHOLDER = "<image>"  # plain text, not an added token: only the prompt builder splits on it
IM_PATCH = "<im_patch>"
IM_START = "<im_start>"
IM_END = "<im_end>"
VI_START = "<vi_start>"
VI_END = "<vi_end>"
VILA_U_TOKENS = (IM_START, IM_END, VI_START, VI_END)

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# as the original generate_image_content / generate_video_content
DEFAULT_NEGATIVE_PROMPT = " "
PADDING_ID = 0  # the original pads CFG rows with zeros (= <unk>), not with pad_token_id

_SPIECE_UNDERLINE = "\u2581"
# The original switched off the model's add_dummy_prefix (LLaMA's tokenizer.model
# has it on) by rewriting the protobuf. A protobuf parser merges a repeated
# sub-message into the first, so appending `normalizer_spec { add_dummy_prefix:
# false }` (field 3, length 2, payload: field 3 = 0) does the same without
# needing the protobuf package.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


class MissingVilaTokensError(CheckpointError, ValueError):
    """The llm/ tokenizer lacks VILA-U's added tokens (<im_start>, ...)."""


class VilaTokenizer:
    """The original's slow LlamaTokenizer, rebuilt on sentencepiece.

    Built from a checkpoint's ``llm/`` folder: ``tokenizer.model``,
    ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``.
    ``add_im_patch_token`` mirrors the original loader, which appends
    ``<im_patch>`` when the model config says ``mm_use_im_patch_token``.
    """

    def __init__(self, llm_dir: str | Path, *, add_im_patch_token: bool = False) -> None:
        llm_dir = Path(llm_dir)
        model_file = llm_dir / "tokenizer.model"
        if not model_file.is_file():
            raise CheckpointError(
                f"llm/ folder '{llm_dir}' has no tokenizer.model",
                "download the full model folder again, or copy tokenizer.model into it",
            )
        self.llm_dir = llm_dir
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_file.read_bytes() + _NO_DUMMY_PREFIX)

        config = _read_optional_json(llm_dir / "tokenizer_config.json")
        special_map = _read_optional_json(llm_dir / "special_tokens_map.json")

        def special(name: str, default: str | None) -> str | None:
            value = special_map.get(name, config.get(name, default))
            return value["content"] if isinstance(value, dict) else value

        self.bos_token = special("bos_token", "<s>")
        self.eos_token = special("eos_token", "</s>")
        self.unk_token = special("unk_token", "<unk>")
        self.pad_token = special("pad_token", None)

        # Added tokens: the saved decoder in tokenizer_config.json, then added_tokens.json.
        added: dict[str, int] = {
            _content(token): int(index) for index, token in config.get("added_tokens_decoder", {}).items()
        }
        added.update(_read_optional_json(llm_dir / "added_tokens.json"))
        for token in (self.bos_token, self.eos_token, self.unk_token, self.pad_token):
            if token is not None and token not in added:
                added[token] = self._sp.piece_to_id(token)

        missing = [token for token in VILA_U_TOKENS if token not in added]
        if missing:
            raise MissingVilaTokensError(
                f"llm/ tokenizer in '{llm_dir}' lacks the VILA-U tokens {', '.join(missing)}",
                "this is not a VILA-U checkpoint or its llm/added_tokens.json is missing",
            )
        if add_im_patch_token and IM_PATCH not in added:
            # as the original loader: tokenizer.add_tokens([<im_patch>]) takes the next free id
            added[IM_PATCH] = _vocab_size(self._sp, added)
        self._added = added
        self._length = _vocab_size(self._sp, added)
        self._added_by_id = {index: token for token, index in added.items()}

        # all_special_tokens of the original: the named ones plus the additional
        # special tokens; the loader's add_tokens(..., special_tokens=True) makes
        # the VILA-U tokens (and <im_patch> when it adds it) additional ones too.
        listed = special_map.get("additional_special_tokens", config.get("additional_special_tokens", []))
        # (a listed token that no vocabulary file defines can never occur in ids)
        additional = [_content(token) for token in listed if _content(token) in added]
        additional += [t for t in VILA_U_TOKENS + ((IM_PATCH,) if add_im_patch_token else ()) if t not in additional]
        named = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t is not None]
        self._special = set(named) | set(additional)
        self._special_ids = {added[token] for token in self._special}
        # as transformers 4.36 _decode: these are decoded as separate pieces of
        # text, joined by single spaces
        self._decoded_alone = (set(added) - self._special) | {
            token for token in additional if added[token] >= self._sp.get_piece_size()
        }
        # as the slow tokenizer's trie: leftmost, then longest added token wins
        alternatives = sorted(added, key=len, reverse=True)
        self._added_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self._unk_piece_count = len(self._sp.encode(self.unk_token, out_type=str))

    # ids of the named tokens

    @property
    def bos_token_id(self) -> int:
        return self._added[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self._added[self.eos_token]

    @property
    def unk_token_id(self) -> int:
        return self._added[self.unk_token]

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._added[self.pad_token]

    @property
    def im_start_id(self) -> int:
        return self._added[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._added[IM_END]

    @property
    def vi_start_id(self) -> int:
        return self._added[VI_START]

    @property
    def vi_end_id(self) -> int:
        return self._added[VI_END]

    @property
    def im_patch_id(self) -> int | None:
        return self._added.get(IM_PATCH)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
        return frozenset(self._special_ids)

    def __len__(self) -> int:
        return self._length

    # encoding

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` (no BOS), as the original slow tokenizer's ``tokenize``."""
        if not text:
            return []
        # as the original (legacy=False, add_prefix_space=True): literal '▁' are
        # spaces, and one '▁' is put in front of the whole text
        text = _SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " ")
        tokens: list[str] = []
        for part in self._added_pattern.split(text):
            if part in self._added:
                tokens.append(part)
            elif part:
                tokens.extend(self._tokenize_chunk(part))
        # as the original: the prefix '▁' is dropped when a special token follows it
        if len(tokens) > 1 and tokens[0] == _SPIECE_UNDERLINE and tokens[1] in self._special:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of ``text``, as ``tokenizer(text).input_ids`` of the original (BOS first)."""
        ids = [self._token_to_id(token) for token in self.tokenize(text)]
        return [self.bos_token_id, *ids] if add_bos else ids

    def tokenize_with_image_slots(self, text: str) -> list[int]:
        """Ids of a prompt with ``IMAGE_TOKEN_INDEX`` for every ``<image>`` (``tokenizer_image_token``)."""
        ids = [self.bos_token_id]
        for chunk in re.split(f"({re.escape(IMAGE_PLACEHOLDER)})", text):
            if chunk == IMAGE_PLACEHOLDER:
                ids.append(IMAGE_TOKEN_INDEX)
            else:
                # as the original: each chunk is tokenized on its own and loses its BOS
                ids.extend(self.encode(chunk, add_bos=False))
        return ids

    # decoding

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, as the original's ``tokenizer.decode``."""
        tokens = [
            self._id_to_token(int(index))
            for index in ids
            if not (skip_special_tokens and int(index) in self._special_ids)
        ]
        texts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self._decoded_alone:
                if run:
                    text = self._tokens_to_string(run)
                    if text:
                        texts.append(text)
                    run = []
                texts.append(token)
            else:
                run.append(token)
        if run:
            texts.append(self._tokens_to_string(run))
        return " ".join(texts)

    # internals

    def _tokenize_chunk(self, chunk: str) -> list[str]:
        # as the original: without add_dummy_prefix sentencepiece drops a leading
        # '▁', so a chunk starting with one is encoded behind "<unk>" and the
        # pieces of "<unk>" are cut off again
        if not chunk.startswith((_SPIECE_UNDERLINE, " ")):
            return self._sp.encode(chunk, out_type=str)
        pieces = self._sp.encode(self.unk_token + chunk, out_type=str)
        return pieces[self._unk_piece_count :] if len(pieces) >= self._unk_piece_count else pieces

    def _token_to_id(self, token: str) -> int:
        index = self._added.get(token)
        return self._sp.piece_to_id(token) if index is None else index

    def _id_to_token(self, index: int) -> str:
        token = self._added_by_id.get(index)
        if token is not None:
            return token
        if not 0 <= index < self._sp.get_piece_size():
            raise InputError(f"token id {index} is outside the vocabulary of the tokenizer in '{self.llm_dir}'")
        return self._sp.id_to_piece(index)

    def _tokens_to_string(self, tokens: list[str]) -> str:
        tokens = list(tokens)
        # as the original: the prefix space added at encoding is removed again
        if tokens[0].startswith(_SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        text = ""
        run: list[str] = []
        for token in tokens:
            if token in self._special:
                # as the original: special tokens are never decoded by sentencepiece
                text += self._sp.decode_pieces(run) + token
                run = []
            else:
                run.append(token)
        return text + self._sp.decode_pieces(run)


def conversation_prompt(message: str, system: str = SYSTEM_PROMPT) -> str:
    """One vicuna_v1 user turn and the open assistant turn (``conv.get_prompt()``).

    `system` replaces the template's system message (the original's is SYSTEM_PROMPT)."""
    if IMAGE_PLACEHOLDER in system:
        raise InputError(
            f"the system prompt contains '{IMAGE_PLACEHOLDER}', which VILA-U reserves for image inputs; remove it"
        )
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
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if IMAGE_PLACEHOLDER in text:
            # the original would embed id -200 and fail inside the LLM
            raise InputError(
                f"the {name} contains '{IMAGE_PLACEHOLDER}', which VILA-U reserves for image inputs; "
                "remove it from the text"
            )
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


def _vocab_size(sp: spm.SentencePieceProcessor, added: dict[str, int]) -> int:
    # as the original len(tokenizer): distinct tokens, sentencepiece pieces plus added ones
    pieces = {sp.id_to_piece(index) for index in range(sp.get_piece_size())}
    return len(pieces | set(added))


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read '{path}': {error}", "download the model folder again") from error


def _content(token: str | dict[str, Any]) -> str:
    # saved tokens are either plain strings or AddedToken dicts
    return token["content"] if isinstance(token, dict) else token
