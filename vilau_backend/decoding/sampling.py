"""Code sampling for the depth transformer: temperature, top-k, top-p.

The semantics are the original's (rqtransformer/modeling_rqtransformer.py,
`top_k_logits`, `top_p_probs`, `sample_from_logits`); what differs is where
the randomness comes from. The original draws with `torch.multinomial` from
the global RNG, so one image's codes depend on the batch it is in. Here every
draw is one uniform number from the image's own generator, turned into a code
by inverting the row's cumulative distribution: the same seed gives the same
image whether it is generated alone or in a batch.

A generation run draws all of an image's uniforms up front (`draw_uniforms`,
(B, P, D), moved to the device once); `pick_codes` then takes the settings as
a tensor too, so one position's sampling has fixed shapes, no host
synchronisation (no `.item()`, no branching on tensor values) and no Python
value that changes between runs: the compiled generation step
(vilau_backend/decoding/position_step.py) replays it, in a CUDA graph on CUDA.

NaN logits become -inf after the top-k filter, as in the original (which also
prints a warning; checking for NaNs would need a host sync, so this does not).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def filter_top_k(logits: torch.Tensor, k: int | torch.Tensor | None, ordered: torch.Tensor | None = None) -> torch.Tensor:
    """Set to -inf every logit below the k-th largest of its row. logits: (B, V).

    Ties with the k-th largest are kept, so more than k codes may survive. With
    k >= V (or None / <= 0) nothing is filtered: the original called
    torch.topk(logits, 900) unconditionally, which fails on smaller codebooks.
    k may be a 0-d tensor (no recompilation when it changes); `ordered`, the
    rows sorted in descending order, saves sorting again.
    """
    V = logits.shape[-1]
    if k is None or (not isinstance(k, torch.Tensor) and (k <= 0 or k >= V)):
        return logits
    if ordered is None:
        ordered = torch.sort(logits, dim=-1, descending=True, stable=True).values  # (B, V)
    k = torch.as_tensor(k, device=logits.device).long()
    k = torch.where((k <= 0) | (k >= V), V, k)  # off: the k-th largest is the smallest
    kth = ordered.index_select(-1, (k - 1).reshape(1))  # (B, 1); sort and topk both rank NaN highest
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(probs: torch.Tensor, p: float | torch.Tensor | None, order: torch.Tensor | None = None) -> torch.Tensor:
    """Nucleus filter on probabilities (B, V), renormalised.

    As the original: in descending order, a token is removed when the
    cumulative probability of the tokens before it already reaches p, so the
    most likely token always survives. p None or >= 1 filters nothing. p may be
    a 0-d tensor; `order` (B, V), indices that sort the rows in descending
    order (ties in any order), saves sorting again.
    """
    if p is None or (not isinstance(p, torch.Tensor) and p >= 1.0):
        return probs
    if order is None:
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices  # (B, V)
    reached = (torch.cumsum(probs.gather(-1, order), dim=-1) >= p) & (p < 1.0)  # (B, V), sorted order
    remove_sorted = torch.zeros_like(reached)
    remove_sorted[..., 1:] = reached[..., :-1]  # shifted right: the top token is never removed
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    kept = probs.masked_fill(remove, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax of each row in float32; the first index wins exact ties. (B, V) -> (B,) int64."""
    return torch.argmax(logits.float(), dim=-1)


def draw_uniforms(generators: list[torch.Generator], positions: int, depth: int) -> torch.Tensor:
    """Every uniform a run needs, (B, positions, depth) float32 on the generators' device.

    Image i's numbers come from generators[i] alone, in the order the depth
    steps use them (position-major), so they are the numbers that one draw per
    depth step would give: the same seed gives the same codes as drawing step by step."""
    return torch.stack([torch.rand(positions, depth, generator=g, device=g.device) for g in generators])


def sampling_knobs(temperature: float, top_k: int | None, top_p: float | None, device: torch.device) -> torch.Tensor:
    """The settings as one float32 tensor (3,): temperature, top_k (0 = off), top_p (1 = off)."""
    return torch.tensor([temperature, top_k or 0, 1.0 if top_p is None else top_p], dtype=torch.float32, device=device)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row the first code whose cumulative
    probability exceeds u * total. probs: (B, V) float32, u: (B,) in [0, 1).

    Codes of probability zero are never returned (their cumulative value
    equals their predecessor's, which cannot exceed the threshold first).
    """
    cdf = torch.cumsum(probs, dim=-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    threshold = u.unsqueeze(-1) * total  # (B, 1)
    # u * total can round up to total itself; keep it strictly below
    threshold = torch.minimum(threshold, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, threshold, right=True).squeeze(-1)  # (B,)


def pick_codes(logits: torch.Tensor, u: torch.Tensor, knobs: torch.Tensor) -> torch.Tensor:
    """One code per row, all in fixed shapes. logits: (B, V) any float dtype; u: (B,) float32
    uniforms; knobs: `sampling_knobs(...)` (3,). Returns (B,) int64.

    Order of operations as the original: float32, / temperature, top-k, NaN -> -inf,
    softmax, top-p, draw. temperature <= 0 or top_k == 1 is exact argmax (first index on
    ties); the draw is then computed and discarded, which keeps the shapes fixed."""
    temperature, top_k, top_p = knobs.unbind()
    is_greedy = (temperature <= 0) | (top_k == 1)
    scaled = logits.float() / torch.where(is_greedy, torch.ones_like(temperature), temperature)  # (B, V)
    # one sort serves both filters: descending logits are descending probabilities
    ordered, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # (B, V)
    scaled = filter_top_k(scaled, top_k, ordered)
    scaled = scaled.masked_fill(torch.isnan(scaled), float("-inf"))
    probs = filter_top_p(F.softmax(scaled, dim=-1), top_p, order)  # (B, V)
    return torch.where(is_greedy, greedy(logits), sample_from_probs(probs, u))
