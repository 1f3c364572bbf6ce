"""`python -m vilau_backend`: the backend from the command line, as the original's inference.py.

Subcommands (`python -m vilau_backend SUBCOMMAND --help` lists every option):
    encode          --model DIR --image A.png [--image B.png ...] --out codes.safetensors
    decode          --model DIR --codes codes.safetensors --out-dir DIR
    describe        --model DIR (--image A.png [--image B.png ...] | --video V.mp4) --query ... [--batch] [--json]
    generate-image  --model DIR --prompt ... --save-dir DIR [--num N] [--save-codes codes.safetensors]
    generate-video  --model DIR --prompt ... --save-dir DIR [--frames 8] [--fps 8] [--save-codes ...]
    edit            --model DIR --image in.png --mode inpaint|vary|continue [--mask mask.png] --prompt ... --save-dir DIR
    caption         --model DIR FOLDER [--question ...] [--overwrite] [--recursive] [--prefix ...] [--suffix ...]
    generate-batch  --model DIR PROMPTS.jsonl --out DIR

caption and generate-batch run as one process or under torchrun / accelerate launch (each
process takes its share of the items; the main process writes the summary); a rerun does only
what is missing.

Every subcommand takes --dtype float32|bfloat16|float16 (default: bfloat16 on a
GPU, float32 on the CPU), --device (default: cuda when available) and
--quantize none|int8|4bit (weight-only LLM and depth transformer; default none) with
--quantized-cache DIR|none (where quantized weights are kept for the next load; default
~/.cache/vila-u/quantized);
all but encode and decode take --compile/--no-compile (default: on with CUDA only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .errors import InputError, VilaUError
from .memory.weight_quantization import QUANTIZE_CHOICES


def read_image_file(path: str | Path, mode: str = "RGB") -> torch.Tensor:
    """An image file as media/files.py reads it (ComfyUI IMAGE (1, H, W, 3); mode "L": a mask's
    (1, H, W, 1)), its path named when it cannot be read."""
    from .media.files import UnreadableImage, read_image

    try:
        return read_image(Path(path), mode=mode)
    except UnreadableImage as error:
        raise InputError(f"cannot read image {path}: {error}") from None


def save_image_file(image: torch.Tensor, path: str | Path) -> None:
    """(H, W, 3) float 0..1 -> PNG, truncating to 8 bits as the original's inference.py does."""
    from .media.files import png_bytes, write_file_whole

    write_file_whole(Path(path), png_bytes(image))


def _load_model(args: argparse.Namespace):
    from .model.vila_u import VilaUModel

    return VilaUModel.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                           quantized_cache=_quantized_cache(args))


def _quantized_cache(args: argparse.Namespace) -> str | None:
    return None if args.quantized_cache == "none" else args.quantized_cache


def _encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    model = _load_model(args)
    images = [read_image_file(p) for p in args.image]
    # each file may have its own size: preprocess one by one, encode as one batch
    pixels = torch.cat([model.preprocess(image) for image in images])
    codes = model.encode_pixels(pixels).codes.cpu().to(torch.int64).contiguous()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"codes": codes}, str(args.out))
    print(f"wrote {args.out}: codes {list(codes.shape)}")
    return 0


def _decode(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    model = _load_model(args)
    tensors = load_file(args.codes)
    if "codes" not in tensors:
        raise VilaUError(f"{args.codes} has no tensor named 'codes' (found: {', '.join(tensors) or 'none'})")
    images = model.decode_codes(tensors["codes"])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image_file(image, out_dir / f"image_{i}.png")
    print(f"wrote {len(images)} image(s) to {out_dir}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    import json

    from .tasks.understand import AnswerRequest, describe_images, describe_video
    from .media.video import read_video

    if args.batch and args.video:
        raise InputError("--batch answers each --image on its own; a --video is always one prompt")
    request = AnswerRequest(question=args.query, sampling=_text_sampling(args), max_new_tokens=args.max_new_tokens,
                            seed=args.seed or 0, batch=args.batch, compile=args.compile)

    model = _load_model(args)
    if args.video:
        frames = read_video(args.video, num_frames=model.config.num_video_frames).frames
        answers = [describe_video(model, frames, request, on_compile=_say_compiling)]
    else:
        images = [read_image_file(p) for p in args.image]
        answers = describe_images(model, images, request, on_compile=_say_compiling)
    if args.json:
        print(json.dumps({
            "answers": [a.text for a in answers],
            "input_ids": [a.input_ids for a in answers],
            "output_ids": [a.output_ids for a in answers],
        }))
    else:
        for answer in answers:
            print(answer.text)
    return 0


def _text_sampling(args: argparse.Namespace):
    """TextSampling from --greedy or the sampling flags (a flag not given takes TextSampling's default)."""
    from .tasks.understand import TextSampling

    sampling_flags = {
        "--temperature": args.temperature, "--top-p": args.top_p, "--top-k": args.top_k, "--seed": args.seed,
    }
    given = [flag for flag, value in sampling_flags.items() if value is not None]
    if args.greedy and given:
        raise InputError(f"--greedy picks the most likely token; it cannot be combined with {', '.join(given)}")
    if args.greedy:
        return TextSampling(do_sample=False, repetition_penalty=args.repetition_penalty)
    defaults = TextSampling()
    return TextSampling(
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_k=defaults.top_k if args.top_k is None else args.top_k,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        repetition_penalty=args.repetition_penalty,
    )


def _image_request(args: argparse.Namespace, frames: int | None = None):
    """The generation flags -> ImageRequest (--num images, or edits of the one image)."""
    from .tasks.requests import ImageRequest, ImageSampling

    sampling = ImageSampling(cfg=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return ImageRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, num_images=args.num, frames=frames,
                        sampling=sampling, seed=args.seed, compile=args.compile)


def _say_compiling(notice: str | None = None) -> None:
    print(notice or "compiling the step (once per batch size and prompt-length bucket)...", file=sys.stderr, flush=True)


def _save_codes(codes: torch.Tensor, path: str | None) -> None:
    if path:
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"codes": codes.cpu().to(torch.int64).contiguous()}, str(path))
        print(f"wrote {path}: codes {list(codes.shape)}")


def _save_images(images: torch.Tensor, folder: str, stem: str) -> None:
    """(N, H, W, 3) -> <folder>/<stem>_0.png, ..."""
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image_file(image, out_dir / f"{stem}_{i}.png")
    print(f"wrote {len(images)} image(s) to {out_dir}")


def _generate_image(args: argparse.Namespace) -> int:
    from .tasks.generate import generate_images

    model = _load_model(args)
    result = generate_images(model, _image_request(args), on_compile=_say_compiling)
    _save_images(result.images, args.save_dir, "image")
    _save_codes(result.codes, args.save_codes)
    return 0


def _generate_video(args: argparse.Namespace) -> int:
    from .tasks.generate import generate_video
    from .media.video import write_video_file

    model = _load_model(args)
    result = generate_video(model, _image_request(args, frames=args.frames), on_compile=_say_compiling)
    out_dir = Path(args.save_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, frames in enumerate(result.images):
        write_video_file(frames, out_dir / f"video_{i}.mp4", fps=args.fps)
        for f, frame in enumerate(frames):
            save_image_file(frame, out_dir / f"video_{i}_frame_{f:03d}.png")
    print(f"wrote {len(result.images)} video(s) of {args.frames} frames to {out_dir}")
    _save_codes(result.codes, args.save_codes)
    return 0


def _edit(args: argparse.Namespace) -> int:
    from .tasks import editing

    if args.mode == "inpaint" and not args.mask:
        raise InputError("--mode inpaint needs --mask: a PNG, white where the image is to be regenerated")
    request = _image_request(args)  # --num edits of the one image
    model = _load_model(args)
    image = read_image_file(args.image)
    codes = model.encode_images(image).codes  # (1, h, w, D)
    if args.mode == "inpaint":
        mask = read_image_file(args.mask, mode="L")[..., 0]  # (1, H, W): white regenerates
        result = editing.inpaint(model, request, codes, mask, images=image,
                                 threshold=args.threshold, grow=args.grow,
                                 feather=args.feather if args.feather >= 0 else None, on_compile=_say_compiling)
    elif args.mode == "vary":
        depth = model.config.quantizer.depth
        kept = args.keep_depths if args.keep_depths is not None else editing.depths_for_strength(args.strength, depth)
        result = editing.vary_by_depth(model, request, codes, kept, on_compile=_say_compiling)
    else:
        rows = model.config.grid[0] // 2 if args.rows is None else args.rows
        result = editing.continue_downward(model, request, codes, rows, on_compile=_say_compiling)
    _save_images(result.images, args.save_dir, "edit")
    _save_codes(result.codes, args.save_codes)
    return 0


def _job_model(args: argparse.Namespace):
    """This process of a job, and the model loaded on its device (its own GPU under a launcher)."""
    from .jobs.processes import JobProcesses
    from .model.vila_u import VilaUModel

    processes = JobProcesses(args.device)
    model = VilaUModel.load(args.model, dtype=args.dtype, device=processes.device, quantize=args.quantize,
                            quantized_cache=_quantized_cache(args))
    return processes, model


def _caption(args: argparse.Namespace) -> int:
    from .jobs.caption_job import caption_job
    from .tasks.captioning import CaptionSettings

    settings = CaptionSettings(
        question=args.question, prefix=args.prefix, suffix=args.suffix, overwrite=args.overwrite,
        recursive=args.recursive, sampling=_text_sampling(args), max_new_tokens=args.max_new_tokens,
        seed=args.seed or 0, batch_size=args.batch_size, compile=args.compile,
    )
    processes, model = _job_model(args)
    summary = caption_job(model, args.folder, settings, processes, job_dir=_path_or_none(args.job_dir),
                          on_compile=_say_compiling)
    return _print_summary(summary)


def _generate_batch(args: argparse.Namespace) -> int:
    from .jobs.generate_job import generate_job

    processes, model = _job_model(args)
    summary = generate_job(model, args.prompts, args.out, processes, compile=args.compile, on_compile=_say_compiling,
                           job_dir=_path_or_none(args.job_dir))
    return _print_summary(summary)


def _path_or_none(text: str | None) -> Path | None:
    return None if text is None else Path(text)


def _print_summary(summary: dict | None) -> int:
    """The main process prints the merged summary; exit status 1 when an item failed."""
    if summary is None:
        return 0
    print(f"{summary['written']} written, {summary['skipped']} skipped, {summary['failed']} failed "
          f"by {summary['processes']} process(es) in {summary['seconds']} s")
    for failure in summary["failures"]:
        print(f"failed: {failure['item']}: {failure['error']}")
    return 1 if summary["failed"] else 0


def _add_edit_arguments(p: argparse.ArgumentParser) -> None:
    from .tasks.editing import DEFAULT_FEATHER, DEFAULT_MASK_THRESHOLD, DEFAULT_STRENGTH

    _add_generation_arguments(p)
    p.add_argument("--image", required=True, help="the image to edit (any size; the model's preprocessing applies)")
    p.add_argument("--mode", choices=["inpaint", "vary", "continue"], required=True,
                   help="inpaint: regenerate under --mask; vary: resample the finer residual depths; "
                   "continue: keep the first --rows rows and generate the rest")
    p.add_argument("--mask", help="inpaint: mask image, white where to regenerate (same size as --image)")
    p.add_argument("--threshold", type=float, default=DEFAULT_MASK_THRESHOLD,
                   help="inpaint: a grid position is regenerated when this fraction of its pixels is masked "
                   "(default %(default)s)")
    p.add_argument("--grow", type=int, default=0, help="inpaint: grow the regenerated region by this many positions")
    p.add_argument("--feather", type=int, default=DEFAULT_FEATHER,
                   help="inpaint: paste the original back outside the region with this soft edge in pixels; "
                   "-1 keeps the decoded image everywhere (default %(default)s)")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                   help="vary: 0 keeps every residual depth (the source), 1 none (default %(default)s)")
    p.add_argument("--keep-depths", type=int, default=None, help="vary: keep exactly this many depths (overrides --strength)")
    p.add_argument("--rows", type=int, default=None, help="continue: grid rows to keep (default: half the grid)")


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    from .tasks.generate import ImageSampling
    from .decoding.prompts import DEFAULT_NEGATIVE_PROMPT

    defaults = ImageSampling()
    add_model_options(p)
    add_compile_option(p)
    p.add_argument("--prompt", required=True, help="what to generate")
    p.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT,
                   help="the unconditional prompt of guidance (default %(default)r, as the original)")
    p.add_argument("--cfg", type=float, default=defaults.cfg, help="classifier-free guidance scale (default %(default)s)")
    p.add_argument("--num", type=int, default=1, help="how many to generate (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed; output i depends only on (seed, i)")
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="depth-code sampling temperature (default %(default)s)")
    p.add_argument("--top-k", type=int, default=defaults.top_k,
                   help="sample among the k most likely codes; 1 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus threshold (default %(default)s)")
    p.add_argument("--save-dir", required=True, help="folder for the outputs")
    p.add_argument("--save-codes", default=None, help="also write the codes to this .safetensors file (tensor 'codes')")


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="run the compiled step (torch.compile; CUDA graphs on CUDA): the first run of a size "
                             "compiles, later ones are faster (default: on with CUDA, off on the CPU)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from .model.vila_u import DTYPES

    parser.add_argument("--model", required=True, help="VILA-U model folder (config.json, llm/, vision_tower/, mm_projector/)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                        help="weight-only quantization of the LLM and depth transformer: int8 (torchao) or 4bit "
                             "(bitsandbytes NF4); default none")
    parser.add_argument("--quantized-cache", default="auto", metavar="DIR",
                        help="folder that keeps quantized weights, so that the next load with the same --quantize "
                             "reads them instead of quantizing again; 'none' for no copy (default: "
                             "~/.cache/vila-u/quantized)")


def _add_answer_arguments(p: argparse.ArgumentParser) -> None:
    from .tasks.understand import DEFAULT_MAX_NEW_TOKENS, TextSampling

    answers = TextSampling()  # sampling flags default to None: --greedy refuses any that is given
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="longest answer in tokens (default %(default)s)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=None, help=f"sampling temperature (default {answers.temperature})")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling threshold (default {answers.top_p})")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"sample among the k most likely tokens; 0 = all (default {answers.top_k})")
    p.add_argument("--seed", type=int, default=None, help="random seed of the sampler (default 0)")
    p.add_argument("--repetition-penalty", type=float, default=answers.repetition_penalty,
                   help="above 1 discourages repeats (default %(default)s = off)")


def _add_dataset_commands(sub) -> None:
    from .jobs.records import JOB_FOLDER
    from .tasks.captioning import CaptionSettings
    from .tasks.understand import DEFAULT_BATCH_SIZE

    p = sub.add_parser("caption", help="caption every image of a folder (<image>.txt beside each); "
                       "one process or many (torchrun / accelerate launch)")
    add_model_options(p)
    add_compile_option(p)
    p.add_argument("folder", help="the folder of images")
    p.add_argument("--question", default=CaptionSettings.question, help="what to ask about each image (default %(default)r)")
    p.add_argument("--prefix", default="", help="text before every caption, as given (e.g. 'ohwx, ')")
    p.add_argument("--suffix", default="", help="text after every caption, as given")
    p.add_argument("--overwrite", action="store_true", help="caption images that already have a caption again "
                   "(default: skip them, which is also how a rerun resumes)")
    p.add_argument("--recursive", action="store_true", help="also caption the images of subfolders")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images answered together (default %(default)s)")
    _add_answer_arguments(p)
    p.add_argument("--job-dir", default=None, help=f"where the logs and summary.json go (default FOLDER/{JOB_FOLDER})")
    p.set_defaults(run=_caption)

    p = sub.add_parser("generate-batch", help="one image per line of a JSON-lines file of prompts; "
                       "one process or many (torchrun / accelerate launch)")
    add_model_options(p)
    add_compile_option(p)
    p.add_argument("prompts", help='JSON lines: {"prompt": ..., "name": ..., "seed": ..., "negative_prompt": ..., '
                   '"cfg": ..., "temperature": ..., "top_k": ..., "top_p": ...}; only "prompt" is required')
    p.add_argument("--out", required=True, help="folder for <name>.png (a rerun makes only the missing ones)")
    p.add_argument("--job-dir", default=None, help=f"where the logs and summary.json go (default OUT/{JOB_FOLDER})")
    p.set_defaults(run=_generate_batch)


def build_parser() -> argparse.ArgumentParser:
    from .media.video import DEFAULT_FPS
    from .tasks.generate import DEFAULT_VIDEO_FRAMES

    parser = argparse.ArgumentParser(prog="python -m vilau_backend", description="VILA-U without ComfyUI")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="images -> RQ codes (safetensors tensor 'codes', int64 [B,h,w,D])")
    add_model_options(p)
    p.add_argument("--image", action="append", required=True, help="an image file; repeat for a batch")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(run=_encode)

    p = sub.add_parser("decode", help="RQ codes -> images image_0.png, image_1.png, ...")
    add_model_options(p)
    p.add_argument("--codes", required=True, help=".safetensors file with tensor 'codes' [B,h,w,D]")
    p.add_argument("--out-dir", required=True, help="folder for the PNGs")
    p.set_defaults(run=_decode)

    p = sub.add_parser("describe", help="answer a question about images or a video (VQA, captions)")
    add_model_options(p)
    add_compile_option(p)
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", action="append", help="an image file; repeat for several images in one prompt")
    media.add_argument("--video", help="a video file (mp4, webm, gif, mov, ...) or a folder of frames")
    p.add_argument("--query", required=True, help="the question, e.g. 'Describe the image.'")
    p.add_argument("--batch", action="store_true", help="answer each --image on its own, one answer per image")
    _add_answer_arguments(p)
    p.add_argument("--json", action="store_true",
                   help='print {"answers", "input_ids", "output_ids"} as one JSON object')
    p.set_defaults(run=_describe)

    p = sub.add_parser("generate-image", help="text -> images image_0.png, ... (codes [N,h,w,D] with --save-codes)")
    _add_generation_arguments(p)
    p.set_defaults(run=_generate_image)

    p = sub.add_parser("generate-video", help="text -> video_0.mp4 and its frames (codes [N,F,h,w,D] with --save-codes)")
    _add_generation_arguments(p)
    p.add_argument("--frames", type=int, default=DEFAULT_VIDEO_FRAMES,
                   help="frames per video (default %(default)s, as the original)")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS, help="frame rate of the mp4 (default %(default)s)")
    p.set_defaults(run=_generate_video)

    p = sub.add_parser("edit", help="edit an image in code space -> edit_0.png, ... (inpaint, vary, continue)")
    _add_edit_arguments(p)
    p.set_defaults(run=_edit)
    _add_dataset_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .decoding import compile_cache

    args = build_parser().parse_args(argv)
    compile_cache.own_inductor_cache()  # this process is ours alone: inductor's cache may move with the pack's
    try:
        return args.run(args)
    except VilaUError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
