"""Which latent space a checkpoint's codes and summed code embeddings belong to.

A VILA-U latent is a sum of code embeddings: it means something only to a model with the
same codebooks (and the decoder trained with them). Two checkpoints of the same geometry
(same channel count and grid) would accept each other's latents and decode garbage, so a
latent carries the id of the latent space it was made in, and consumers compare ids.

The id hashes the codebooks as stored in the checkpoint, upcast to float64 (exact from any
stored float dtype), so one checkpoint has one id whatever dtype or device it is loaded in.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch

from .loading import INDEX_NAME, SafetensorsFolder

CODEBOOK_PREFIX = "rqvaesiglip.quantizer."


def latent_space_id(vision_tower_dir: str | Path) -> str:
    """A 16-hex-digit id of the codebooks in `vision_tower_dir` (cached per folder and file state)."""
    folder = Path(vision_tower_dir).resolve()
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_NAME)
    state = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)  # a replaced file is a new model
    return _codebook_hash(str(folder), state)


@lru_cache(maxsize=16)
def _codebook_hash(folder: str, state: tuple) -> str:
    """The codebooks' hash; `state` (the files' names, sizes and times) is read by nothing but the
    cache, for which a replaced file makes a new key."""
    digest = hashlib.sha256()
    with SafetensorsFolder(Path(folder)) as weights:
        for key in sorted(k for k in weights.keys() if k.startswith(CODEBOOK_PREFIX)):
            tensor = weights.get(key, torch.float64).contiguous()
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]

