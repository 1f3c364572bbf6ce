"""Schema pieces every VILA-U node shares: the model socket, the category, seeds, advanced knobs."""

from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "VILA-U"

# The loaded model travels between nodes on this socket (DESIGN.md: contracts with ComfyUI).
VilaUModelSocket = io.Custom("VILAU_MODEL")

SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF


def model_input() -> io.Input:
    return VilaUModelSocket.Input("model", tooltip="The VILA-U model, from VILA-U Model Loader.")


def seed_input(tooltip: str) -> io.Int.Input:
    return io.Int.Input(
        "seed", default=0, min=0, max=SEED_MAX, control_after_generate=True, tooltip=tooltip
    )


def advanced(widget: io.Input) -> io.Input:
    """Mark an expert knob: the front end (1.32+) folds inputs with `advanced` away by default.

    ComfyUI 0.3.75's V3 inputs have no `advanced` argument; the option is passed through as is."""
    widget.extra_dict["advanced"] = True
    return widget
