"""VILA-U Model Loader."""

from __future__ import annotations

from comfy_api.latest import io

from . import model_cache, model_files
from .schema import CATEGORY, VilaUModelSocket, check_combo


class ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = model_files.model_choices()  # listed again at every /object_info: new folders show up on refresh
        return io.Schema(
            node_id="VILAU_ModelLoader",
            display_name="VILA-U Model Loader",
            category=CATEGORY,
            description=(
                "Loads a VILA-U model (one model for image and video Q&A, text-to-image, text-to-video and "
                "RQ-VAE encode/decode). Models are folders in ComfyUI/models/vila-u (or the vila_u paths of "
                "extra_model_paths.yaml). The same options give the same loaded model, shared by every loader "
                "node; it is handed to ComfyUI's memory management like any core model."
            ),
            inputs=[
                io.Combo.Input(
                    "model",
                    options=choices,
                    default=choices[0],
                    tooltip=(
                        "A model folder found in models/vila-u or the vila_u paths of extra_model_paths.yaml, or a "
                        "published model (mit-han-lab/vila-u-7b-256: 256 px images; mit-han-lab/vila-u-7b-384: "
                        "384 px), which is used from models/vila-u/<name> and downloaded there when missing."
                    ),
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(model_cache.DTYPE_CHOICES),
                    default="auto",
                    tooltip="Weight precision. auto: bf16 on GPUs that support it (else fp16), fp32 on the CPU.",
                ),
                io.Combo.Input(
                    "device",
                    options=model_cache.device_choices(),
                    default="auto",
                    tooltip="Where the model runs. auto: ComfyUI's device (the CPU when ComfyUI runs with --cpu).",
                ),
                io.Boolean.Input(
                    "download_if_missing",
                    default=True,
                    tooltip=(
                        "For a published model that is not in models/vila-u yet: download it from Hugging Face "
                        "(about 14 GB for the 7B models; progress on the node; an interrupted download resumes). "
                        "Off: report what is missing instead."
                    ),
                ),
            ],
            outputs=[VilaUModelSocket.Output(display_name="model", tooltip="The loaded VILA-U model.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, model: str | None = None) -> bool | str:
        # core never checks the options of an input that validate_inputs takes (0.3.75 and newer alike):
        # this check is the only one, and says where models are looked for
        if model is not None and model not in model_files.model_choices():
            roots = ", ".join(str(root) for root in model_files.model_roots())
            return (
                f"no VILA-U model named '{model}' in {roots}: choose one of the list, or put the model folder "
                "(config.json, llm/, vision_tower/, mm_projector/) there and refresh the page (press R)"
            )
        return True

    @classmethod
    def execute(cls, model: str, dtype: str, device: str, download_if_missing: bool) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        check_combo("dtype", dtype, list(model_cache.DTYPE_CHOICES))
        check_combo("device", device, model_cache.device_choices())
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            # first, and at every call: newer ComfyUI throttles progress-bar updates, and while the
            # file list is not known yet (total 0) there is no bar to update at all
            comfy.model_management.throw_exception_if_processing_interrupted()
            if total <= 0:
                return
            if bar is None:
                bar = comfy.utils.ProgressBar(total)
            bar.update_absolute(done, total)

        folder = model_files.resolve_model(model, download_if_missing, progress)
        loaded = model_cache.get_model(model, folder, dtype, device)
        warn_if_slow_on_cpu(loaded.key.dtype, loaded.key.device, cls.hidden.unique_id)
        return io.NodeOutput(loaded)


def slow_on_cpu_warning(dtype: str, device: str) -> str | None:
    """What to tell someone who runs bf16 or fp16 on the CPU, where few CPUs compute in those types."""
    if device != "cpu" or dtype not in ("bfloat16", "float16"):
        return None
    return (
        f"VILA-U: {dtype} on the CPU is 30-50x slower than float32 (most CPUs have no fast {dtype} kernels; "
        "encoding plus decoding one image took 31 s against 0.7 s). Choose dtype fp32 or auto for CPU runs"
    )


def warn_if_slow_on_cpu(dtype: str, device: str, node_id: str | None) -> None:
    """In the log, and as text on the loader node."""
    import logging

    message = slow_on_cpu_warning(dtype, device)
    if message is None:
        return
    logging.warning(message)
    if node_id is not None:
        from server import PromptServer

        PromptServer.instance.send_progress_text(message, node_id)
