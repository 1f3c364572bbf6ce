"""Schema pieces every VILA-U node shares: the model socket, the category, seeds, advanced knobs,
and checking combo values."""

from __future__ import annotations

import inspect

from comfy_api.latest import io

CATEGORY = "VILA-U"

# The loaded model travels between nodes on this socket (docs/ARCHITECTURE.md: Contracts with ComfyUI).
VilaUModelSocket = io.Custom("VILAU_MODEL")

SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF


def model_input() -> io.Input:
    return VilaUModelSocket.Input("model", tooltip="The VILA-U model, from VILA-U Model Loader.")


def seed_input(tooltip: str) -> io.Int.Input:
    return io.Int.Input(
        "seed", default=0, min=0, max=SEED_MAX, control_after_generate=True, tooltip=tooltip
    )


def advanced(input_class: type[io.Input], id: str, **options) -> io.Input:
    """input_class(id, **options), marked as an expert knob: front ends fold such inputs away
    (Nodes 2.0 and the properties panel of front ends 1.3x and newer).

    Newer ComfyUI takes `advanced=True` as an argument of every V3 input, and that is used when the
    running ComfyUI has it; ComfyUI 0.3.75's inputs have no such argument (most not even
    `extra_dict`), and there the same key is added to the input's definition after it is made."""
    if "advanced" in inspect.signature(input_class.__init__).parameters:
        return input_class(id, advanced=True, **options)
    widget = input_class(id, **options)
    widget.extra_dict["advanced"] = True  # as_dict() merges extra_dict into the definition
    return widget


def check_combo(name: str, value, options: list) -> None:
    """Refuse a combo value that is not one of its options (sent through the API, or an option of
    another machine, e.g. a cuda device).

    Asked of every core alike, so nothing about core needs probing: ComfyUI 0.3.75 checks only
    old-style combos (options given as the input's type) and lets a V3 combo's value through to
    here; newer cores refuse such a prompt before any node runs, so this check only ever sees
    their valid values; and no core checks a value that arrives over a link, nor one that the
    node's validate_inputs takes as an argument."""
    from ..vilau_backend.errors import InputError

    if value in options:
        return
    raise InputError(f"{name} '{value}' is not available here; choose one of: {', '.join(map(str, options))}")
