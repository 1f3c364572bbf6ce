"""Images into an answer's prompt: each image's projected features take the place of its slot.

As the original's ``prepare_inputs_labels_for_multimodal``: the prompt is tokenized with
``IMAGE_TOKEN_INDEX`` at each ``<image>`` slot; each image is encoded by the vision tower, its
quantizer features z_q (h*w, C) projected into the LLM and spliced in where its slot was.

Shapes: N images, P grid positions per image (h*w), C vision width, H LLM hidden, T prompt positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..checkpoint.tokenizer import IMAGE_TOKEN_INDEX
from ..errors import InputError

if TYPE_CHECKING:
    from ..model.vila_u import VilaUModel


@torch.inference_mode()
def prompt_embeddings(model: VilaUModel, input_ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """Prompt ids with N image slots + pixels (N, 3, S, S) -> the LLM's inputs_embeds (T, H)."""
    n_images = pixels.shape[0]
    z_q = model.encode_pixels(pixels).z_q  # (N, h, w, C)
    # as the original: understanding feeds the quantizer's z_q (not the code-embedding sum)
    image_embeds = model.project(z_q.reshape(n_images, -1, z_q.shape[-1]))  # (N, P, H)
    return splice_image_embeddings(model, input_ids, image_embeds)


@torch.inference_mode()
def splice_image_embeddings(model: VilaUModel, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
    """Prompt ids with N image slots + image_embeds (N, P, H) -> inputs_embeds (T, H), T = len(ids) - N + N*P."""
    slots = [i for i, token in enumerate(input_ids) if token == IMAGE_TOKEN_INDEX]
    if len(slots) != image_embeds.shape[0]:
        raise InputError(f"the prompt has {len(slots)} image slots but {image_embeds.shape[0]} images were given")
    ids = torch.tensor(input_ids, device=model.device).clamp(min=0)  # slots embedded as id 0, then replaced
    text_embeds = model.llm.get_input_embeddings()(ids)  # (len(ids), H)
    pieces, start = [], 0
    for slot, features in zip(slots, image_embeds):
        pieces += [text_embeds[start:slot], features.to(text_embeds.dtype)]
        start = slot + 1
    pieces.append(text_embeds[start:])
    return torch.cat(pieces)
