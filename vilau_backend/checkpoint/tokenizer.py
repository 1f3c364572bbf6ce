"""The tokenizer of VILA-U's LLM, exactly as the original tokenized.

The original tokenized with transformers 4.36's *slow* sentencepiece
``LlamaTokenizer`` (``legacy=False``, ``add_prefix_space=True``, VILA's
replaced ``tokenization_llama.py``). Later transformers versions changed that
tokenizer (5.x encodes ``" "`` as ``[bos, 905]`` where the original gave
``[bos, 264]``), so :class:`VilaTokenizer` drives the ``sentencepiece`` model
itself and repeats the slow tokenizer's steps; the ids then do not depend on
the installed transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from ..errors import CheckpointError, InputError

IMAGE_TOKEN_INDEX = -200  # id of an image slot in input_ids; spliced out before the LLM
IMAGE_PLACEHOLDER = "<image>"  # plain text, not an added token: only the prompt builder splits on it
IM_PATCH = "<im_patch>"
IM_START = "<im_start>"
IM_END = "<im_end>"
VI_START = "<vi_start>"
VI_END = "<vi_end>"
VILA_U_TOKENS = (IM_START, IM_END, VI_START, VI_END)

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
        self.llm_dir = llm_dir
        self._sp = _load_sentencepiece(llm_dir)
        config = _read_optional_json(llm_dir / "tokenizer_config.json")
        special_map = _read_optional_json(llm_dir / "special_tokens_map.json")

        def special(name: str, default: str | None) -> str | None:
            value = special_map.get(name, config.get(name, default))
            return _content(value) if value is not None else None

        self.bos_token = special("bos_token", "<s>")
        self.eos_token = special("eos_token", "</s>")
        self.unk_token = special("unk_token", "<unk>")
        self.pad_token = special("pad_token", None)
        named = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t is not None]

        self._added = self._added_tokens(config, named, add_im_patch_token)
        self._length = _vocab_size(self._sp, self._added)
        self._added_by_id = {index: token for token, index in self._added.items()}
        listed = special_map.get("additional_special_tokens", config.get("additional_special_tokens", []))
        self._set_special_tokens(named, listed, add_im_patch_token)
        # as the slow tokenizer's trie: leftmost, then longest added token wins
        alternatives = sorted(self._added, key=len, reverse=True)
        self._added_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self._unk_piece_count = len(self._sp.encode(self.unk_token, out_type=str))

    def _added_tokens(self, config: dict[str, Any], named: list[str], add_im_patch_token: bool) -> dict[str, int]:
        """Added tokens: the saved decoder in tokenizer_config.json, then added_tokens.json."""
        added: dict[str, int] = {
            _content(token): int(index) for index, token in config.get("added_tokens_decoder", {}).items()
        }
        added.update(_read_optional_json(self.llm_dir / "added_tokens.json"))
        for token in named:
            if token not in added:
                added[token] = self._sp.piece_to_id(token)
        missing = [token for token in VILA_U_TOKENS if token not in added]
        if missing:
            raise MissingVilaTokensError(
                f"llm/ tokenizer in '{self.llm_dir}' lacks the VILA-U tokens {', '.join(missing)}",
                "this is not a VILA-U checkpoint or its llm/added_tokens.json is missing",
            )
        if add_im_patch_token and IM_PATCH not in added:
            # as the original loader: tokenizer.add_tokens([<im_patch>]) takes the next free id
            added[IM_PATCH] = _vocab_size(self._sp, added)
        return added

    def _set_special_tokens(self, named: list[str], listed: list, add_im_patch_token: bool) -> None:
        # all_special_tokens of the original: the named ones plus the additional
        # special tokens; the loader's add_tokens(..., special_tokens=True) makes
        # the VILA-U tokens (and <im_patch> when it adds it) additional ones too.
        # (a listed token that no vocabulary file defines can never occur in ids)
        additional = [_content(token) for token in listed if _content(token) in self._added]
        additional += [t for t in VILA_U_TOKENS + ((IM_PATCH,) if add_im_patch_token else ()) if t not in additional]
        self._special = set(named) | set(additional)
        self._special_ids = {self._added[token] for token in self._special}
        # as transformers 4.36 _decode: these are decoded as separate pieces of
        # text, joined by single spaces
        self._decoded_alone = (set(self._added) - self._special) | {
            token for token in additional if self._added[token] >= self._sp.get_piece_size()
        }

    # token ids

    @property
    def bos_token_id(self) -> int:
        return self._added[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self._added[self.eos_token]

    def token_id(self, token: str) -> int | None:
        """Id of an added or named special token (``"<im_start>"``, ``tokenizer.pad_token``, ...);
        None when this tokenizer has no such token."""
        return self._added.get(token)

    def __len__(self) -> int:
        return self._length

    @property
    def longest_piece(self) -> int:
        """The most characters one token can stand for (the longest piece of the vocabulary, a
        byte-fallback piece's '<0x..>' counted whole): a text of n characters takes at least
        n / longest_piece tokens, known without tokenizing it."""
        if not hasattr(self, "_longest_piece"):
            pieces = (self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()))
            self._longest_piece = max(max(map(len, pieces)), max(map(len, self._added), default=1))
        return self._longest_piece

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


def _load_sentencepiece(llm_dir: Path) -> spm.SentencePieceProcessor:
    model_file = llm_dir / "tokenizer.model"
    if not model_file.is_file():
        raise CheckpointError(
            f"llm/ folder '{llm_dir}' has no tokenizer.model",
            "download the full model folder again, or copy tokenizer.model into it",
        )
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_file.read_bytes() + _NO_DUMMY_PREFIX)
    except (RuntimeError, OSError) as exc:  # sentencepiece only says "ParseFromArray ... failed"
        raise CheckpointError(
            f"{model_file} is not a sentencepiece tokenizer model (it is truncated or corrupt)",
            "download the model's llm/tokenizer.model again",
        ) from exc
    return sp


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
