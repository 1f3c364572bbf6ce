"""The code sampler: top-k / top-p filtering, per-image generators, and draws that follow the distribution."""

from __future__ import annotations

import pytest
import torch

from code_sampling import sample_codes
from vilau_backend.decoding.sampling import filter_top_k, filter_top_p, greedy, sample_from_probs

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)


def test_top_k_keeps_every_logit_tied_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5]])
    kept = filter_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, True, True, False]]
    assert kept[torch.isfinite(kept)].tolist() == [3.0, 2.0, 2.0]


def test_top_k_at_or_above_vocabulary_filters_nothing():
    logits = torch.randn(2, 5)
    assert torch.equal(filter_top_k(logits, 5), logits)
    assert torch.equal(filter_top_k(logits, 900), logits)  # the original's default on a small codebook


def test_top_p_keeps_the_top_token_even_when_it_alone_exceeds_p():
    probs = torch.tensor([[0.05, 0.9, 0.05]])
    assert filter_top_p(probs, 0.5).tolist() == [[0.0, 1.0, 0.0]]
    assert filter_top_p(probs, 1e-6).tolist() == [[0.0, 1.0, 0.0]]


def test_top_p_keeps_tokens_until_the_cumulative_probability_reaches_p():
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    # sorted 0.5, 0.3, 0.2 -> cumulative 0.5, 0.8, 1.0: the 0.2 comes after p = 0.7 was reached
    torch.testing.assert_close(filter_top_p(probs, 0.7), torch.tensor([[0.0, 0.625, 0.375]]))
    torch.testing.assert_close(filter_top_p(probs, 0.4), torch.tensor([[0.0, 1.0, 0.0]]))


def test_same_generator_seed_gives_same_codes():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> list[int]:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(4)]
        return sample_codes(logits, 1.0, 50, 0.9, gens).tolist()

    assert draw(100) == draw(100)
    assert draw(100) != draw(200)


def test_row_draws_only_from_its_own_generator():
    logits = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    seeds = [21, 22, 23]
    batch = sample_codes(logits, 1.0, None, None, [torch.Generator().manual_seed(s) for s in seeds])
    for i, s in enumerate(seeds):
        alone = sample_codes(logits[i : i + 1], 1.0, None, None, [torch.Generator().manual_seed(s)])
        assert alone.item() == batch[i].item(), f"row {i}: {alone.item()} alone, {batch[i].item()} in a batch of 3"


def test_temperature_zero_and_top_k_one_are_exact_argmax():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 4.0, 5.0]]).bfloat16()
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    assert sample_codes(logits, temperature=0.0).tolist() == [1, 0]  # first index on ties
    assert sample_codes(logits, 1.0, top_k=1, generators=gens).tolist() == [1, 0]
    assert greedy(logits).dtype == torch.int64


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20_000
    g = torch.Generator().manual_seed(1234)
    # one shared generator for every row: row i takes the i-th draw from it
    codes = sample_codes(probs.log().expand(n, 4), 1.0, None, None, [g] * n)
    freq = torch.bincount(codes, minlength=4).float() / n
    # a frequency over n draws has standard deviation at most sqrt(0.25 / n) = 0.0035: five of them
    torch.testing.assert_close(freq, probs, rtol=0, atol=5 * (0.25 / n) ** 0.5)


def test_draws_after_top_k_follow_the_renormalised_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20_000
    g = torch.Generator().manual_seed(99)
    codes = sample_codes(probs.log().expand(n, 4), 1.0, 2, None, [g] * n)
    freq = torch.bincount(codes, minlength=4).float() / n
    # five binomial standard deviations (p(1 - p) <= 1/4), as the test above; excluded codes exactly 0
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]), rtol=0, atol=5 * (0.25 / n) ** 0.5)


def test_nan_logits_are_never_drawn():
    logits = torch.tensor([[float("nan"), 0.0, float("nan"), 0.0]]).expand(500, 4)
    codes = sample_codes(logits, 1.0, None, None, [torch.Generator().manual_seed(5)] * 500)
    assert set(codes.tolist()) <= {1, 3}


def test_zero_probability_codes_are_never_returned_at_the_ends_of_the_unit_interval():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0]])
    u = torch.tensor([0.0, 1.0 - 2**-24])
    assert sample_from_probs(probs, u).tolist() == [1, 2]
