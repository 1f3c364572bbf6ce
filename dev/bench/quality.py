"""How far quantized weights move VILA-U's decisions: int8 / 4-bit against fp32 or bf16, same weights.

    python -m dev.bench.quality --model DIR [--reference float32] [--dtype float32] [--quantize int8 4bit]
    python -m dev.bench.quality --preset medium [--reference bfloat16] [--dtype bfloat16] [--quantize int8 4bit]

--model reads a checkpoint folder (e.g. the golden checkpoint, tests/fixtures/vilau-tiny-256/checkpoint);
--preset builds dev/bench/generate.py's random-weight model of that size in memory.
The reference model runs in --reference dtype unquantized; each candidate runs in
--dtype with the LLM and depth transformer quantized. Printed per candidate:

- code agreement: the reference generates greedy codes (cfg 3, argmax at every
  depth); both models are then teacher-forced along those codes, and this is the
  share of (position, depth) decisions where the candidate's guided argmax equals
  the reference's;
- depth KL: mean KL(reference || candidate) of the guided depth distributions
  (softmax of the guided logits in float32), in nats;
- answer agreement: the reference answers a question about an image greedily;
  teacher-forced along that answer, the share of tokens the candidate also picks
  first.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


from vilau_backend.tasks.generate import ImageSampling, generate_codes
from vilau_backend.decoding.compiled_steps import cache_length, step_key
from vilau_backend.decoding.position_step import PositionState, advance
from vilau_backend.model.llm import forward_hidden
from vilau_backend.decoding.prompts import cfg_batch, understanding_prompt
from vilau_backend.decoding.answer_loop import generate_text
from vilau_backend.tasks.image_splicing import splice_image_embeddings
from vilau_backend.tasks.understand import GREEDY

PROMPT = "a red apple on a table"
QUESTION = "Describe the image in detail."


@torch.inference_mode()
def guided_depth_logits(model, prompt: str, codes: torch.Tensor, cfg: float = 3.0) -> torch.Tensor:
    """Teacher forcing along `codes` (B, P, D): the guided depth logits of every decision, (B, P, D, V) float32."""
    B, P, _ = codes.shape
    input_ids, attention_mask = cfg_batch(model.tokenizer, prompt, " ", n=B, video=False)
    rows = codes.to(model.device).repeat(2, 1, 1)  # (R, P, D): both halves follow the same codes
    # the generation step with every code kept feeds the given codes to the LLM, position by position
    state = PositionState(model, step_key(model, 2 * B, cache_length(input_ids.shape[1], P)))
    keep = torch.ones(B, P, rows.shape[-1], dtype=torch.bool)
    state.begin(input_ids, attention_mask, torch.zeros(keep.shape), ImageSampling(top_k=1), given=rows[:B], keep=keep)
    state.prefill(model)
    out = []
    for p in range(P):
        hidden = state.hidden.clone()  # (R, H): the LLM state before position p
        advance(model, state, state.grid_indices[p])
        logits = model.vision.depth(hidden, rows[:, p], model.vision.quantizer.embed_codes).float()  # (R, D, V)
        out.append(logits[B:] + cfg * (logits[:B] - logits[B:]))  # (B, D, V)
    return torch.stack(out, 1)


@torch.inference_mode()
def answer_logits(model, image: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """Teacher forcing along `answer`: the logits before each of its tokens, (len(answer), V) float32."""
    input_ids = model.tokenizer.tokenize_with_image_slots(understanding_prompt(QUESTION, 1))
    z_q = model.encode_images(image).z_q  # (1, h, w, C)
    prompt = splice_image_embeddings(model, input_ids, model.project(z_q.reshape(1, -1, z_q.shape[-1])))  # (T, H)
    answer_embeds = model.llm.get_input_embeddings()(torch.tensor(answer[:-1], device=model.device))
    embeds = torch.cat([prompt, answer_embeds])[None]  # (1, T + A - 1, H)
    hidden = forward_hidden(model.llm, None, inputs_embeds=embeds)  # no cache given: transformers makes its own
    return model.llm.lm_head(hidden[0, prompt.shape[0] - 1:]).float()  # (A, V)


def reference_answer(model, image: torch.Tensor, max_new_tokens: int) -> list[int]:
    input_ids = model.tokenizer.tokenize_with_image_slots(understanding_prompt(QUESTION, 1))
    z_q = model.encode_images(image).z_q
    with torch.inference_mode():
        embeds = splice_image_embeddings(model, input_ids, model.project(z_q.reshape(1, -1, z_q.shape[-1])))
        return generate_text(model, embeds, sampling=GREEDY, max_new_tokens=max_new_tokens)


def compare(reference, candidate, *, images: int = 2, answer_tokens: int = 32, seed: int = 0) -> dict[str, float]:
    """The three figures of the module docstring for one candidate model against the reference."""
    codes = generate_codes(reference, PROMPT, num_images=images, sampling=ImageSampling(top_k=1)).flatten(1, 2)
    ref = guided_depth_logits(reference, PROMPT, codes)  # (B, P, D, V)
    cand = guided_depth_logits(candidate, PROMPT, codes).to(ref.device)
    kl = torch.nn.functional.kl_div(cand.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    image = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(seed))
    answer = reference_answer(reference, image, answer_tokens)
    tokens = torch.tensor(answer)
    answer_ref = answer_logits(reference, image, answer).argmax(-1).cpu()
    answer_cand = answer_logits(candidate, image, answer).argmax(-1).cpu()
    return {
        "code_agreement": (ref.argmax(-1) == cand.argmax(-1)).float().mean().item(),
        "depth_kl": kl.mean().item(),
        "answer_agreement": (answer_cand == tokens).float().mean().item(),
        "answer_reference_self": (answer_ref == tokens).float().mean().item(),
        "decisions": ref.shape[0] * ref.shape[1] * ref.shape[2],
        "answer_tokens": len(answer),
    }


def _load(args, dtype: str, quantize: str, workdir: Path):
    from vilau_backend.model.vila_u import VilaUModel, resolve_device

    if args.model:
        return VilaUModel.load(args.model, dtype=dtype, device=args.device, quantize=quantize)
    from dev.bench.generate import build_random_model

    device = resolve_device(args.device)
    return build_random_model(args.preset, getattr(torch, dtype), device, workdir, quantize=quantize)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a VILA-U checkpoint folder")
    source.add_argument("--preset", help="a dev/bench/generate.py preset: golden-size, medium, full (random weights)")
    parser.add_argument("--reference", default="float32", help="dtype of the unquantized reference (default float32)")
    parser.add_argument("--dtype", default=None, help="compute dtype of the candidates (default: the reference's)")
    parser.add_argument("--quantize", nargs="+", default=["int8", "4bit"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)  # the random-weight presets
    with tempfile.TemporaryDirectory() as tmp:
        reference = _load(args, args.reference, "none", Path(tmp))
        print(f"reference: {args.model or args.preset}, {args.reference}, not quantized")
        for scheme in args.quantize:
            torch.manual_seed(0)  # same random weights as the reference
            candidate = _load(args, args.dtype or args.reference, scheme, Path(tmp))
            r = compare(reference, candidate, images=args.images, answer_tokens=args.answer_tokens)
            print(f"  {scheme:5s} ({args.dtype or args.reference}): code agreement {100 * r['code_agreement']:.2f}% of "
                  f"{r['decisions']} decisions, depth KL {r['depth_kl']:.5f} nats, answer agreement "
                  f"{100 * r['answer_agreement']:.1f}% of {r['answer_tokens']} tokens", flush=True)
            del candidate


if __name__ == "__main__":
    main()
