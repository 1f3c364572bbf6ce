"""Running the Llama LLM on embeddings with a KV cache, across transformers 4.50 .. 5.x.

Both understanding and generation feed the LLM embeddings (text embeddings with
image features spliced in, or projected code sums), never token ids, and read
its final-norm hidden states. What differs between transformers versions is
kept here: the name of the cache argument (`past_key_values`, renamed `cache`
in 5.x) and the StaticCache constructor.

Masks are built here as 4-D additive float masks (R, 1, Q, K), which every
supported version passes to attention unchanged: the mask, like the cache, is
then ours to allocate once and index, with no data-dependent checks inside
transformers (which would synchronise with the GPU every step).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


_cache_arguments: dict[type, str] = {}  # model class -> the name of its forward's cache argument


def _cache_argument(model_class: type) -> str:
    # a plain dict rather than functools.cache: dynamo traces it inside the compiled steps without a warning
    name = _cache_arguments.get(model_class)
    if name is None:
        params = inspect.signature(model_class.forward).parameters
        name = _cache_arguments[model_class] = "cache" if "cache" in params else "past_key_values"
    return name


def new_static_cache(llm: nn.Module, rows: int, length: int, dtype: torch.dtype, device: torch.device):
    """A KV cache for `rows` sequences of up to `length` positions, allocated once, each layer's
    on the device that layer runs on (vilau_backend/memory/placement.py may spread them)."""
    from transformers import StaticCache

    from ..memory.placement import layer_devices

    # 4.50 takes max_batch_size/device/dtype and a per-layer device map; 5.x sizes and places
    # each layer on first use and ignores them
    options = dict(config=llm.config, max_cache_len=length, max_batch_size=rows, device=device, dtype=dtype)
    devices = layer_devices(llm)
    if any(d != torch.device(device) for d in devices) and "layer_device_map" in inspect.signature(StaticCache).parameters:
        options["layer_device_map"] = dict(enumerate(devices))
    return StaticCache(**options)


def forward_hidden(
    llm: nn.Module,
    kv_cache,
    *,
    inputs_embeds: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache_position: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Llama body on embeddings (R, T, H) or ids (R, T), with a KV cache -> final-norm hidden states (R, T, H).

    attention_mask, when given, is a 4-D additive mask (R, 1, T, K); without it one
    unpadded row gets the causal mask transformers derives from the cache. The text
    head (lm_head) is not run: callers apply it to the positions they want."""
    body = llm.model
    inputs = dict(inputs_embeds=inputs_embeds, input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids, cache_position=cache_position)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    device = (inputs_embeds if inputs_embeds is not None else input_ids).device
    hidden = body(use_cache=True, **{_cache_argument(type(body)): kv_cache}, **inputs).last_hidden_state
    return hidden.to(device)  # from the last layer's GPU when the layers are split


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (R, 1, Q, K) -> float mask: 0 where attention is allowed, the dtype's minimum elsewhere.

    The minimum rather than -inf keeps fully masked rows (queries at left padding) finite."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as the original: cumsum(mask) - 1, padding set to 1. (R, T) -> (R, T)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill_(~attention_mask.bool(), 1)
