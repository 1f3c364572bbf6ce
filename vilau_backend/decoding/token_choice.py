"""How an answer's next token is chosen: the sampling settings, transformers' logits processors in
`generate`'s order (repetition penalty, then temperature, top-k, top-p when sampling), and the draw,
on the CPU from each row's own generator.

Shapes: B rows, V vocabulary, n tokens generated so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError, require_finite


@dataclass(frozen=True)
class TextSampling:
    """How the next token is chosen. The defaults are the original's inference defaults
    (the published llm/generation_config.json: do_sample, temperature 0.9, top_p 0.6;
    top_k 50 is transformers' default). ``do_sample=False`` is greedy (argmax); the
    repetition penalty applies to both, as in transformers."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50  # 0 disables
    top_p: float = 0.6  # 1.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables

    def __post_init__(self) -> None:
        require_finite(temperature=self.temperature, top_p=self.top_p, repetition_penalty=self.repetition_penalty)
        if self.do_sample and not self.temperature > 0:
            raise InputError(
                f"temperature must be above 0 when sampling, got {self.temperature}; use greedy decoding instead"
            )
        if self.top_k < 0:
            raise InputError(f"top_k must be 0 (off) or more, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InputError(f"top_p must lie in 0..1, got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be above 0 (1.0 is off), got {self.repetition_penalty}")


GREEDY = TextSampling(do_sample=False)


def logits_processors(sampling: TextSampling):
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    # the conditions under which transformers' generate adds each processor
    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.do_sample:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k != 0:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return processors


def next_tokens(
    logits: torch.Tensor, seen: torch.Tensor, processors, do_sample: bool, generators, live: list[bool], eos: int
) -> torch.Tensor:
    """logits (B, V) float32, generated ids seen (B, n) -> the chosen ids (B,); `eos` for stopped rows."""
    # the processors see the generated ids only, as `generate` does when given embeddings
    scores = processors(seen, logits)  # (B, V)
    if not do_sample:
        return scores.argmax(dim=-1).masked_fill_(~torch.tensor(live, device=scores.device), eos)
    # drawn on the CPU, row by row from each row's generator: the same seed picks the same
    # token on any device and whatever the other rows are
    probs = torch.softmax(scores, dim=-1).cpu()  # (B, V)
    chosen = [
        int(torch.multinomial(probs[b : b + 1], num_samples=1, generator=generators[b])) if alive else eos
        for b, alive in enumerate(live)
    ]
    return torch.tensor(chosen, dtype=torch.long, device=logits.device)
