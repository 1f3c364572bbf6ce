"""Working memory: the bytes a run allocates beyond the weights, estimated before it allocates them.

The KV cache and step buffers of a 7B run are large (about 0.5 GiB per guided image at 256 px in
bf16, 8 GiB at batch 16) and, for a compiled run, stay allocated until the next run of another
size. ComfyUI cannot see them unless it is told: before a run allocates, the task asks the model's
`make_room` (set by the nodes: ComfyUI unloads other models until that much is free and says how
much is) and refuses the run with what it needs and what to do when it still does not fit.

Estimates, in bytes, for a run of R rows over a cache of L positions (T prompt tokens): the KV
cache, 2 x layers x R x kv_heads x head_dim x L in the model dtype, and the step buffers
(position_step.PositionState, text_step.TextState), kept between compiled runs; on top of them one
layer's prefill activations; for images, the pixel decoder at full resolution over the batch after
the codes (with the state still held when it is kept); for answers, the vision tower's encoding of
their images before them, which is asked for with the answer's own estimate, before any image is
encoded. tests/backend/test_working_memory.py checks the estimate against the allocations a run makes
on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError

log = logging.getLogger(__name__)

GiB = 2**30
# make_room(bytes) -> bytes free on the model's device once other models made room; None: no limit known
RoomCallback = Callable[[int], "int | None"]


@dataclass(frozen=True)
class WorkingMemory:
    peak: int  # the most a run allocates at once beyond the weights
    held: int  # what stays allocated after a compiled run (KV cache and step buffers, kept for the next)


def _llm_shape(model) -> tuple[int, int, int, int, int]:
    """(layers, kv_heads, head_dim, hidden, intermediate) of the model's LLM."""
    c = model.llm.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads, head_dim, c.hidden_size, c.intermediate_size


def _llm_weights(model) -> torch.Tensor:
    """The LLM's input embeddings: in the compute dtype (never quantized), on the device the run starts on."""
    return model.llm.get_input_embeddings().weight


def kv_cache_bytes(model, rows: int, length: int) -> int:
    layers, kv_heads, head_dim, _, _ = _llm_shape(model)
    return 2 * layers * rows * kv_heads * head_dim * length * _llm_weights(model).dtype.itemsize


def prefill_bytes(model, rows: int, prompt_len: int, length: int, masked: bool = True) -> int:
    """One layer's activations while the prompt runs: the MLP's gate, up and product (R, T, I), five
    (R, T, H) (the residual, its norm, q, k, v) and, for `masked` (left-padded or CFG) batches, the
    additive mask (R, 1, T, L) with the bool mask it is made from; scaled-dot-product attention keeps
    its scores inside its kernel."""
    _, _, _, hidden, intermediate = _llm_shape(model)
    itemsize = _llm_weights(model).dtype.itemsize
    mask = length * (itemsize + 1) if masked else 0
    return rows * prompt_len * (mask + (3 * intermediate + 5 * hidden) * itemsize)


def decode_bytes(model, images: int) -> int:
    """The pixel decoder over `images` at full resolution: at the finest level an input of the level
    above's channels and three of its own (norm, activation, convolution) live at once, plus the
    float32 output and its ComfyUI copy."""
    spec = model.config.decoder
    size = spec.resolution
    finest_in = spec.ch * spec.ch_mult[min(1, len(spec.ch_mult) - 1)]
    finest = spec.ch * spec.ch_mult[0]
    pixels = images * size * size
    return pixels * (finest_in + 3 * finest) * model.dtype.itemsize + pixels * 3 * 4 * 2


def image_state_bytes(model, rows: int, length: int) -> int:
    """position_step.PositionState: the KV cache, the (B, L, D) uniforms, forced codes, keep mask and codes,
    the (R, L) key mask and two (L,) indices, the (R, H) state."""
    B, D, H = rows // 2, model.config.quantizer.depth, model.config.llm.hidden_size
    per_position = B * D * (4 + 8 + 1 + 8) + rows + 2 * 8
    return kv_cache_bytes(model, rows, length) + length * per_position + rows * H * model.dtype.itemsize


def generation_memory(model, images: int, prompt_len: int, length: int, kept: bool) -> WorkingMemory:
    """A generation run of `images` (CFG doubles the rows) over a cache of `length` positions, then the
    decoding of its images. `kept`: the step state stays allocated (a compiled run) while decoding."""
    rows = 2 * images
    held = image_state_bytes(model, rows, length)
    during = held + prefill_bytes(model, rows, prompt_len, length)
    after = decode_bytes(model, images) + (held if kept else 0)
    return WorkingMemory(peak=max(during, after), held=held if kept else 0)


def answer_memory(model, rows: int, prompt_len: int, length: int, kept: bool) -> WorkingMemory:
    """An answer run of `rows` prompts over a cache of `length` positions (text_step.TextState,
    whole from the start, eager or compiled): its prefill, then the steps with the (B, V) float32
    logits the step, the token choice and its processors hold. `kept`: the state stays allocated
    for the next run (a compiled run)."""
    vocab = model.llm.lm_head.weight.shape[0]
    state = kv_cache_bytes(model, rows, length) + rows * vocab * 4 + length * (rows + 2 * 8)  # + mask, indices
    peak = state + max(prefill_bytes(model, rows, prompt_len, length), 2 * rows * vocab * 4)
    return WorkingMemory(peak=peak, held=state if kept else 0)


def encode_bytes(model, images: int) -> int:
    """The vision tower encoding `images` images at once (understanding): their pixels in the model's
    device and dtype, then the larger of SigLIP's attention, where a layer holds its (N, heads, n, n)
    scores, their float32 softmax (and its cast back to a 16-bit dtype) beside five (N, n, C) (the hidden
    state, q, k, v and the attention's output), and the quantizer's nearest-code search: three (N, n, C)
    (the residual, the sum of the chosen codes, the squared residual) beside either the squared (C, K)
    codebook, reduced to (1, K) before the distances are made, or the (N*n, K) distances and the sums they
    are added to (rq_codebook._nearest_code)."""
    siglip, quantizer = model.config.siglip, model.config.quantizer
    itemsize = model.dtype.itemsize
    n, K, size = siglip.grid * siglip.grid, quantizer.n_embed, siglip.image_size
    hidden = images * n * siglip.hidden_size * itemsize
    softmax = 4 + (itemsize if itemsize != 4 else 0)
    attention = images * siglip.num_attention_heads * n * n * (itemsize + softmax) + 5 * hidden
    search = max(2 * images * n * K, quantizer.embed_dim * K) * itemsize + 3 * hidden
    converted = _llm_weights(model).device.type != "cpu" or model.dtype != torch.float32  # pixels come as fp32 on the CPU
    return images * 3 * size * size * itemsize * converted + max(attention, search)


def understanding_memory(model, answer: WorkingMemory, prompts: int, prompt_len: int, encoded_at_once: int) -> WorkingMemory:
    """An answer run (`answer`: answer_memory) with the encoding of its images before it: `prompts`
    prompts of `prompt_len` positions, whose images are encoded `encoded_at_once` at a time. The prompts'
    (T, H) embeddings pile up while the images are encoded and stay through the run."""
    embeds = prompts * prompt_len * model.config.llm.hidden_size * _llm_weights(model).dtype.itemsize
    return WorkingMemory(peak=embeds + max(encode_bytes(model, encoded_at_once), answer.peak), held=answer.held)


QUANTIZE_REMEDY = ("choose quantize int8 or 4bit (on the loader, or --quantize on the command line: smaller weights "
                   "leave more room), or free memory that other models hold")


def reserve_for_run(model, key, memory: WorkingMemory, what: str, remedy: str) -> None:
    """`reserve` before a run whose step state is `key`: a state already held for that key is reused,
    and a compiled run of another size first frees the held one (as step_state would, but before asking)."""
    if memory.held and key in model.step_states:  # key: None for runs that hold nothing
        need = memory.peak - memory.held
    else:
        if memory.held:
            model.release_step_states()
        need = memory.peak
    reserve(model, need, what, f"{remedy}, or {QUANTIZE_REMEDY}")


def reserve(model, need: int, what: str, remedy: str) -> None:
    """Ask for `need` bytes before allocating them; raise InputError, having allocated nothing,
    when the model's device cannot free that much. `what` names the run, `remedy` what to change."""
    free = free_bytes(model, need)
    if free is None or need <= free:
        return
    raise InputError(
        f"{what} needs about {need / GiB:.1f} GiB of working memory beyond the weights; "
        f"{free / GiB:.1f} GiB are free on {_llm_weights(model).device}: {remedy}")


def free_bytes(model, need: int) -> int | None:
    """Bytes free on the model's device once room was made for `need` (None: the CPU, no limit checked)."""
    make_room: RoomCallback | None = getattr(model, "make_room", None)
    if make_room is not None:
        return make_room(need)
    device = _llm_weights(model).device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    # what torch's caching allocator holds but does not use is free for this run too
    return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def held_bytes(states) -> int:
    """Bytes of the tensors held by step states (their buffers and their KV cache's layers, whichever
    way the transformers version stores them), each storage counted once."""
    storages: dict[int, int] = {}

    def visit(value, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif depth and isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth - 1)
        elif depth and isinstance(value, dict):
            for item in value.values():
                visit(item, depth - 1)
        elif depth and hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
            for item in vars(value).values():
                visit(item, depth - 1)

    visit(list(states), 6)  # states -> state -> cache -> layers -> layer -> keys
    return sum(storages.values())
