"""Code sampling with the settings as numbers and the uniforms drawn per call, for tests that check
the sampler's semantics draw by draw: the same computation as the generation step's `pick_codes`
(decoding/sampling.py), which takes uniforms drawn up front and the settings as a tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vilau_backend.decoding.sampling import greedy, pick_codes, sampling_knobs


def uniforms(n: int, generators: list[torch.Generator] | None, device: torch.device) -> torch.Tensor:
    """One U[0, 1) float32 draw per row: (n,). Row i draws only from generators[i]."""
    if generators is None:
        return torch.rand(n, device=device)
    assert len(generators) == n, f"{n} rows need {n} generators, got {len(generators)}"
    return torch.cat([torch.rand(1, generator=g, device=g.device).to(device) for g in generators])


def sample_codes(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """One code per row. logits: (B, V) in any float dtype -> (B,) int64.

    `generators[i]` is the only source of randomness of row i (one draw per call); None uses
    torch's global generator. temperature <= 0 or top_k == 1 is exact argmax, drawing nothing."""
    if temperature <= 0 or top_k == 1:
        return greedy(logits)
    u = uniforms(logits.shape[0], generators, logits.device)  # (B,)
    return pick_codes(logits, u, sampling_knobs(temperature, top_k, top_p, logits.device))


def at_every_depth(sample: Callable[[torch.Tensor], torch.Tensor]):
    """A sampler that does not care about the depth (e.g. `greedy`) as the depth transformer's
    `sample(guided logits (B, V), depth) -> codes (B,)`."""
    return lambda logits, d: sample(logits)
