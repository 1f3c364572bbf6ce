"""`generate-batch PROMPTS.jsonl --out DIR`: one image per line of a JSON-lines file, by one or
several processes, each taking the lines whose number is its own modulo the process count.

A line is an object: ``prompt`` (required), and optionally ``name`` (the output is
``<name>.png``; default the line number, ``000042``), ``negative_prompt``, ``seed`` (default the
line number), ``cfg``, ``temperature``, ``top_k``, ``top_p``. A line's image depends only on the
line (its seed draws the image's own random numbers, tasks/generate.py), so it is the same file
whichever process makes it. A rerun makes only the images that do not exist yet: each is written
whole, so one that exists is finished. A line that cannot be used fails on its own, with its
line number and the reason; the others go on.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..decoding.compiled_steps import CompileCallback
from ..decoding.prompts import DEFAULT_NEGATIVE_PROMPT
from ..errors import InputError, VilaUError
from ..media.files import png_bytes, write_file_whole
from ..tasks.generate import generate_images
from ..tasks.requests import ImageRequest, ImageSampling
from .processes import JobProcesses
from .records import JOB_FOLDER, JobLog, finish_job

LINE_KEYS = {"prompt", "name", "negative_prompt", "seed"} | {f.name for f in fields(ImageSampling)}
_NAME = re.compile(r"[^/\\\x00-\x1f]{1,200}")  # one file name: no folders, no control characters


@dataclass(frozen=True)
class PromptLine:
    number: int  # from 1, as an editor counts lines
    name: str
    request: ImageRequest  # one image; the run's compile choice is added when it is made


def read_prompt_lines(path: Path) -> list[PromptLine | tuple[int, str]]:
    """Every non-blank line of `path`: a PromptLine, or (line number, what is wrong with it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read the prompts file {path}: {error}") from None
    lines, names = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                parsed = _parse_line(number, line)
                if parsed.name in names:
                    raise InputError(f"the name '{parsed.name}' is taken by an earlier line; give each line its own name")
                names.add(parsed.name)
                lines.append(parsed)
            except InputError as error:
                lines.append((number, str(error)))
    if not lines:
        raise InputError(f"{path} holds no prompts: write one JSON object a line, e.g. {{\"prompt\": \"a red apple\"}}")
    return lines


def _parse_line(number: int, line: str) -> PromptLine:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(entry, dict):
        raise InputError("a line must be a JSON object such as {\"prompt\": \"a red apple\"}")
    unknown = sorted(set(entry) - LINE_KEYS)
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)}; a line may have {', '.join(sorted(LINE_KEYS))}")
    prompt = entry.get("prompt", "")  # missing: refused by ImageRequest as an empty prompt
    if not isinstance(prompt, str):
        raise InputError("the prompt must be text")
    name = str(entry.get("name", f"{number:06d}"))
    if not _NAME.fullmatch(name) or name.startswith(".") or name.strip() != name:
        raise InputError(f"name {name!r} must be a plain file name (no folders, not hidden, no surrounding spaces)")
    seed = entry.get("seed", number)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a whole number >= 0, got {seed!r}")
    knobs = {key: entry[key] for key in entry if key in {f.name for f in fields(ImageSampling)}}
    for key, value in knobs.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InputError(f"{key} must be a number, got {value!r}")
    negative = entry.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT)
    if not isinstance(negative, str):
        raise InputError("negative_prompt must be text")
    request = ImageRequest(prompt=prompt, negative_prompt=negative, seed=seed, sampling=ImageSampling(**knobs))
    return PromptLine(number, name, request)


def generate_job(
    model, prompts_file: str | Path, out: str | Path, processes: JobProcesses, *,
    compile: bool | None = None, on_compile: CompileCallback | None = None, job_dir: Path | None = None,
) -> dict | None:
    """Make this process's share of the images of `prompts_file` in `out`; the summary (main process) or None."""
    started = time.monotonic()
    out = Path(out).expanduser().absolute()
    lines = [line for place, line in enumerate(read_prompt_lines(Path(prompts_file))) if processes.share.owns(place)]
    out.mkdir(parents=True, exist_ok=True)
    log = JobLog(job_dir or out / JOB_FOLDER, processes.share, unit="img")
    todo = []
    for line in lines:
        if isinstance(line, tuple):
            log.finished(f"line {line[0]}", "failed", line[1])
        elif _output(out, line).exists():
            log.finished(_output(out, line).name, "skipped", "exists")
        else:
            todo.append(line)
    log.start(len(todo))
    try:
        for line in todo:
            _generate_one(model, line, out, log, compile, on_compile)
    finally:
        log.close()
    return finish_job(processes, log, "generate-batch", started)


def _output(out: Path, line: PromptLine) -> Path:
    return out / f"{line.name}.png"


def _generate_one(model, line: PromptLine, out: Path, log: JobLog, compile: bool | None,
                  on_compile: CompileCallback | None) -> None:
    target = _output(out, line)
    try:
        result = generate_images(model, replace(line.request, compile=compile), on_compile=on_compile)
        write_file_whole(target, png_bytes(result.images[0]))
    except (VilaUError, RuntimeError, OSError) as error:  # one line's problem (too long a prompt, memory, disk)
        log.finished(target.name, "failed", f"line {line.number}: {error}")
        return
    log.finished(target.name, "written")
