"""Code sampling for the depth transformer: temperature, top-k, top-p.

The semantics are the original's (rqtransformer/modeling_rqtransformer.py,
`top_k_logits`, `top_p_probs`, `sample_from_logits`); what differs is where
the randomness comes from. The original draws with `torch.multinomial` from
the global RNG, so one image's codes depend on the batch it is in. Here every
row i draws exactly one uniform number per call, from `generators[i]` only,
and turns it into a code by inverting the row's cumulative distribution: the
same seed gives the same image whether it is generated alone or in a batch.

Nothing here synchronises with the host (no `.item()`, no branching on tensor
values), so a sampling step can run inside a captured CUDA graph.

NaN logits become -inf after the top-k filter, as in the original (which also
prints a warning; checking for NaNs would need a host sync, so this does not).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .errors import InputError


def filter_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Set to -inf every logit below the k-th largest of its row. logits: (B, V).

    Ties with the k-th largest are kept, so more than k codes may survive. With
    k >= V (or None / <= 0) nothing is filtered: the original called
    torch.topk(logits, 900) unconditionally, which fails on smaller codebooks.
    """
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(probs: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter on probabilities (B, V), renormalised.

    As the original: in descending order, a token is removed when the
    cumulative probability of the tokens before it already reaches p, so the
    most likely token always survives. p None or >= 1 filters nothing.
    """
    if p is None or p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (B, V)
    reached = torch.cumsum(sorted_probs, dim=-1) >= p  # (B, V)
    remove_sorted = torch.zeros_like(reached)
    remove_sorted[..., 1:] = reached[..., :-1]  # shifted right: the top token is never removed
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    kept = probs.masked_fill(remove, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax of each row in float32; the first index wins exact ties. (B, V) -> (B,) int64."""
    return torch.argmax(logits.float(), dim=-1)


def uniforms(n: int, generators: list[torch.Generator] | None, device: torch.device) -> torch.Tensor:
    """One U[0, 1) float32 draw per row: (n,). Row i draws only from generators[i]."""
    if generators is None:
        return torch.rand(n, device=device)
    if len(generators) != n:
        raise InputError(f"sampling {n} images needs {n} random generators, got {len(generators)}")
    draws = [torch.rand(1, generator=g, device=g.device) for g in generators]
    return torch.cat([u.to(device, non_blocking=True) for u in draws])


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


def is_greedy(temperature: float, top_k: int | None) -> bool:
    """Whether sampling is exact argmax, which draws nothing."""
    return temperature <= 0 or top_k == 1


def skip_draws(generators: list[torch.Generator], calls: int, *, temperature: float, top_k: int | None) -> None:
    """Advance every generator past the draws of `calls` calls of sample_codes with these settings
    (one draw per call, none when greedy), as if those codes had been sampled and discarded."""
    if is_greedy(temperature, top_k):
        return
    for g in generators:
        for _ in range(calls):  # one draw per call, exactly as sample_codes makes them
            torch.rand(1, generator=g, device=g.device)


def sample_codes(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Draw one code per row. logits: (B, V) in any float dtype -> (B,) int64.

    Order of operations as the original: float32, / temperature, top-k,
    NaN -> -inf, softmax, top-p, draw. temperature <= 0 or top_k == 1 means
    exact argmax (torch.argmax: first index on ties), drawing nothing.
    `generators[i]` is the only source of randomness of row i (one draw per
    call); None uses torch's global generator.
    """
    if is_greedy(temperature, top_k):
        return greedy(logits)
    scaled = logits.float() / temperature  # (B, V)
    scaled = filter_top_k(scaled, top_k)
    scaled = scaled.masked_fill(torch.isnan(scaled), float("-inf"))
    probs = filter_top_p(F.softmax(scaled, dim=-1), top_p)  # (B, V)
    return sample_from_probs(probs, uniforms(probs.shape[0], generators, probs.device))
