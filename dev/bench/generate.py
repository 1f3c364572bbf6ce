"""Benchmark text-to-image generation and answers on random-weight models of chosen sizes.

    python -m dev.bench.generate --preset golden-size [medium full] [--geometry 256|384] [--batch 1 4] [--compile|--no-compile]
                             [--dtype ...] [--device ...] [--repeats 1] [--eager-positions N] [--quantize none|int8|4bit]
                             [--answer-tokens 32]

Presets (random weights, built in memory, no files):
  golden-size  the golden checkpoint's geometry: LLM 80 wide x 2 layers, SigLIP 64, 16x16 grid, depth 4,
               1024 codes
  medium       LLM 1024 wide x 8 layers, SigLIP 256, 16x16 grid, depth 4, 4096 codes, depth transformer 512 x 3
  full         LLaMA-2-7B (4096 x 32, 32 heads, MLP 11008), SigLIP-large vision (1024 x 24, 256 px / 16),
               depth 4, 16384 codes; the depth transformer (2560 wide, 40 heads, 6 layers) and decoder
               follow the original code's defaults, since the published configs are not available here
Geometry: 256 = the 256 px model's 16x16 grid x depth 4; 384 = the 384 px model's 27x27 grid x depth 16
(SigLIP so400m/14 at full size, decoded from a 24x24 latent).
Prints, per batch size: ms per grid position, positions/s, s per image (decode included), peak memory;
then, with --answer-tokens N (default 32; 0: off), ms per answer token of B answers generated together
after an image-sized prompt (decode steps only: (time for N tokens - time for 1) / (N - 1)).
--compile measures eager and compiled runs in the same process (alternating, best of --repeats each) and also
prints the compile time (first compiled run minus a later one) and the compiled/eager speed ratio;
--no-compile measures eager only; the default is the backend's (compiled on CUDA, eager on the CPU).
--eager-positions N stops eager runs after N positions and extrapolates (for slow eager runs on big models).
Timings are for comparing runs on one machine, not absolute figures.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


from vilau_backend.checkpoint.config import (
    DecoderSpec,
    DepthSpec,
    LlmSpec,
    ProjectorSpec,
    QuantizerSpec,
    SiglipVisionSpec,
    VilaUConfig,
)
from vilau_backend.tasks.generate import ImageSampling, generate_codes
from vilau_backend.model.vila_u import VilaUModel, VisionTower, resolve_device, resolve_dtype
from vilau_backend.decoding.compiled_steps import resolve_compile
from vilau_backend.model.projector import Projector
from vilau_backend.memory.weight_quantization import DEPTH_TARGETS, LLM_TARGETS, QUANTIZE_CHOICES, quantize_module
from vilau_backend.testing.random_checkpoint import write_tokenizer
from vilau_backend.checkpoint.tokenizer import VilaTokenizer
from vilau_backend.decoding.answer_loop import generate_texts
from vilau_backend.tasks.understand import GREEDY

PRESETS = {
    #          llm: hidden, layers, heads, mlp | siglip: width, layers, heads, mlp | codes, depth-tf: width, heads, layers | decoder: ch, ch_mult, res blocks, z
    "golden-size": dict(llm=(80, 2, 4, 160), siglip=(64, 2, 4, 128), n_embed=1024, depth_tf=(48, 4, 2), decoder=(32, (1, 1, 1, 1, 1), 1, 32)),
    "medium": dict(llm=(1024, 8, 16, 2816), siglip=(256, 4, 4, 1024), n_embed=4096, depth_tf=(512, 8, 3), decoder=(64, (1, 1, 2, 2, 4), 1, 128)),
    "full": dict(llm=(4096, 32, 32, 11008), siglip=(1024, 24, 16, 4096), n_embed=16384, depth_tf=(2560, 40, 6), decoder=(128, (1, 1, 2, 2, 4), 2, 256)),
}


GEOMETRIES = {
    # image px, patch, grid, depth, decoder latent (None: the grid)
    "256": (256, 16, 16, 4, None),
    "384": (384, 14, 27, 16, (24, 24)),
}
FULL_SIGLIP_384 = (1152, 26, 16, 4304)  # so400m-patch14-384, all layers but the last


def build_random_model(preset: str, dtype: torch.dtype, device: torch.device, workdir: Path,
                       geometry: str = "256", quantize: str = "none") -> VilaUModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset]
    size, patch, grid, depth, latent = GEOMETRIES[geometry]
    hidden, layers, heads, mlp = p["llm"]
    width, s_layers, s_heads, s_mlp = FULL_SIGLIP_384 if (preset, geometry) == ("full", "384") else p["siglip"]
    ch, ch_mult, res_blocks, z = p["decoder"]
    n_words = write_tokenizer(workdir, 512)
    tokenizer = VilaTokenizer(workdir)
    vocab = max(len(tokenizer), 32004 if preset == "full" else len(tokenizer))
    config = VilaUConfig(
        root=workdir,
        llm=LlmSpec(hidden_size=hidden, vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                    rope_linear_factor=2.0, tokenizer_model_max_length=8192),
        siglip=SiglipVisionSpec(hidden_size=width, intermediate_size=s_mlp, num_hidden_layers=s_layers + 1,
                                num_attention_heads=s_heads, image_size=size, patch_size=patch, num_channels=3,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0, source="random"),
        quantizer=QuantizerSpec(n_embed=p["n_embed"], embed_dim=width, grid=(grid, grid), depth=depth, shared_codebook=True),
        decoder=DecoderSpec(ch=ch, out_ch=3, ch_mult=ch_mult, num_res_blocks=res_blocks, attn_resolutions=(16,),
                            resolution=size, z_channels=z, latent_shape=latent),
        depth=DepthSpec(embed_dim=p["depth_tf"][0], n_layer=p["depth_tf"][2], n_head=p["depth_tf"][1],
                        vocab_size=p["n_embed"], depth=depth, code_dim=width, llm_dim=hidden),
        projector=ProjectorSpec(kind="mlp2x_gelu", in_dim=width, out_dim=hidden),
        image_aspect_ratio="resize", num_video_frames=8,
        mm_use_im_start_end=True, mm_use_vi_start_end=True, mm_use_im_patch_token=False,
    )
    llm_config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                             rope_scaling={"type": "linear", "factor": 2.0}, tie_word_embeddings=False)
    llm_config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(llm_config).eval().requires_grad_(False)
            vision = VisionTower(config).eval().requires_grad_(False)
            projector = Projector(config.projector).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    assert n_words > 0
    if quantize != "none":  # the same layers VilaUModel.load quantizes
        quantize_module(llm, quantize, LLM_TARGETS, dtype)
        quantize_module(vision.depth, quantize, DEPTH_TARGETS, dtype)
    return VilaUModel(config, tokenizer, llm, vision, projector, dtype, quantize)


def peak_memory_mb(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"


class StopEarly(Exception):
    pass


@dataclass
class Timing:
    loop_s: float  # the position loop (prefill included), extrapolated to all positions when stopped early
    decode_s: float


def timed_run(model: VilaUModel, batch: int, seed: int, compile: bool, stop_after: int | None) -> Timing:
    """One text-to-image call (and its decode), synchronised; stop_after cuts the loop short and extrapolates."""
    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    P = model.config.tokens_per_image
    marks: list[float] = []

    def on_position(done: int, total: int, codes) -> None:
        if stop_after is not None:
            sync()
            marks.append(time.perf_counter())
            if done >= stop_after:
                raise StopEarly

    sync()

    t = time.perf_counter()
    try:
        codes = generate_codes(model, "a red apple on a table", num_images=batch, seed=seed, sampling=ImageSampling(),
                               compile=compile, on_position=on_position)
    except StopEarly:
        per_position = (marks[-1] - marks[0]) / (len(marks) - 1)
        return Timing(loop_s=(marks[0] - t) + per_position * (P - 1), decode_s=float("nan"))
    sync()
    loop = time.perf_counter() - t
    model.decode_codes(codes)
    sync()
    return Timing(loop_s=loop, decode_s=time.perf_counter() - t - loop)


def answer_seconds(model: VilaUModel, batch: int, compile: bool, tokens: int) -> tuple[float, int]:
    """(seconds, tokens generated) of `batch` greedy answers to an image-sized prompt of random embeddings."""
    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    H = model.config.llm.hidden_size
    generator = torch.Generator().manual_seed(0)
    T = model.config.tokens_per_image + 40  # one image and a short question
    prompts = [(torch.randn(T, H, generator=generator) * 0.02).to(device, model.dtype) for _ in range(batch)]
    sync()
    t = time.perf_counter()
    outputs = generate_texts(model, prompts, sampling=GREEDY, max_new_tokens=tokens, compile=compile)
    sync()
    return time.perf_counter() - t, max(len(ids) for ids in outputs)


def bench_answers(model: VilaUModel, batch: int, modes: list[bool], tokens: int, repeats: int) -> None:
    """ms per answer token (decode steps: a run of `tokens` minus a run of 1, which is the prefill)."""
    per_token = {}
    for mode in modes:
        answer_seconds(model, batch, mode, tokens)  # compiles (compiled mode) and warms up
        runs = []
        for _ in range(repeats):
            full, made = answer_seconds(model, batch, mode, tokens)
            prefill, _ = answer_seconds(model, batch, mode, 1)
            runs.append((full - prefill) / max(1, made - 1))
        per_token[mode] = min(runs)
        print(f"  batch {batch} {'compiled' if mode else 'eager':>8}: {1000 * per_token[mode]:8.2f} ms/answer token, "
              f"{batch / per_token[mode]:8.1f} tokens/s", flush=True)
    if len(per_token) == 2:
        print(f"  batch {batch}  compiled / eager answer speed: {per_token[False] / per_token[True]:.2f}x", flush=True)


def report(label: str, batch: int, P: int, runs: list[Timing], device: torch.device) -> float:
    loop = min(r.loop_s for r in runs)
    decode = min(r.decode_s for r in runs)
    decode_text = f"{decode / batch:.3f} s of it decoding" if decode == decode else "decode not timed"
    per_image = (loop + (decode if decode == decode else 0.0)) / batch
    print(f"  batch {batch} {label:>8}: {1000 * loop / P:8.2f} ms/position, {P * batch / loop:8.1f} positions/s, "
          f"{per_image:.3f} s/image ({decode_text}), peak {peak_memory_mb(device)}", flush=True)
    return loop


def bench_preset(preset: str, args, device: torch.device, dtype: torch.dtype, modes: list[bool]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = build_random_model(preset, dtype, device, Path(tmp), args.geometry, args.quantize)
        print(f"preset {preset}, {args.geometry} px geometry: built in {time.perf_counter() - t0:.1f} s on {device} "
              f"({dtype}, quantize {args.quantize}); {model.weight_bytes() / 2**20:.0f} MiB of weights; "
              f"{torch.get_num_threads()} threads", flush=True)
        P = model.config.tokens_per_image
        timed_run(model, 1, 0, False, args.eager_positions)  # first-call allocations, lazy inits
        for batch in args.batch:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs: dict[bool, list[Timing]] = {mode: [] for mode in modes}
            compile_s = None
            if True in modes:
                first = timed_run(model, batch, 0, True, None)  # compiles for this batch size
                runs[True].append(timed_run(model, batch, 0, True, None))
                compile_s = first.loop_s - runs[True][0].loop_s
            for r in range(args.repeats):  # alternate, so that both modes see the same machine load
                for mode in modes:
                    if mode and r == 0:
                        continue
                    runs[mode].append(timed_run(model, batch, r, mode, None if mode else args.eager_positions))
            loops = {mode: report("compiled" if mode else "eager", batch, P, runs[mode], device) for mode in modes}
            if compile_s is not None:
                print(f"  batch {batch}  compile: {compile_s:.1f} s (first compiled run minus a later one)", flush=True)
            if len(loops) == 2:
                print(f"  batch {batch}  compiled / eager speed: {loops[False] / loops[True]:.2f}x positions/s", flush=True)
        if args.answer_tokens:
            print(f"answers ({args.answer_tokens} tokens after a prompt of one image):", flush=True)
            for batch in args.batch:
                bench_answers(model, batch, modes, args.answer_tokens, args.repeats)
        model.release_step_states()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, nargs="+", default=["golden-size"])
    parser.add_argument("--geometry", choices=GEOMETRIES, default="256")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="--compile: eager and compiled in one run; --no-compile: eager only (default: the backend's)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                        help="weight-only quantization of the LLM and depth transformer (default none)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per batch size and mode (after one warm-up)")
    parser.add_argument("--answer-tokens", type=int, default=32,
                        help="also time answers of this many tokens per batch size (0: images only)")
    parser.add_argument("--eager-positions", type=int, default=None,
                        help="time eager runs over this many positions only and extrapolate")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    modes = [False, True] if args.compile else [resolve_compile(args.compile, device)]
    for preset in args.preset:
        bench_preset(preset, args, device, dtype, modes)


if __name__ == "__main__":
    main()
