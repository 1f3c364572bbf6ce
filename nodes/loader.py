"""VILA-U Model Loader."""

from __future__ import annotations

from comfy_api.latest import io

from ..vilau_backend.memory.weight_quantization import QUANTIZE_CHOICES
from . import model_cache, model_files
from .progress import show_status
from .schema import CATEGORY, VilaUModelSocket, check_combo, model_input


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
                    tooltip=(
                        "Where the model runs. auto: ComfyUI's device (the CPU when ComfyUI runs with --cpu). "
                        "'all GPUs' (with two or more): the LLM's layers are split over every GPU."
                    ),
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
                # quantize, keep_loaded and compile came later: optional and after the first four, so that
                # workflows and API graphs saved before them still load, with the same widget values
                io.Combo.Input(
                    "quantize",
                    options=list(QUANTIZE_CHOICES),
                    default="none",
                    optional=True,
                    tooltip=(
                        "Weight-only quantization of the LLM's layers and the depth transformer (the vision tower "
                        "and decoder keep dtype). none: about 14 GB of VRAM for the 7B models in bf16. int8: about "
                        "half (torchao; CPU and GPU; codes agree with bf16 on ~96% of decisions). 4bit: about a "
                        "third (bitsandbytes NF4; CPU and CUDA; needs `pip install bitsandbytes`; lower quality). "
                        "Whatever does not fit in free VRAM streams from CPU memory, which is much slower."
                    ),
                ),
                io.Boolean.Input(
                    "keep_loaded",
                    default=True,
                    optional=True,
                    tooltip=(
                        "On: the model stays loaded between runs (ComfyUI may still move it off the GPU when other "
                        "models need the room). Off: its VRAM and RAM are freed after every VILA-U node that uses "
                        "it, and the next use reads the weights from disk again."
                    ),
                ),
                io.Combo.Input(
                    "compile",
                    options=list(model_cache.COMPILE_CHOICES),
                    default="auto",
                    optional=True,
                    tooltip=(
                        "Run image generation and answers through compiled steps (torch.compile; CUDA graphs on "
                        "CUDA). The first run of each batch size compiles (the node shows 'compiling…'; Cancel "
                        "takes effect when compiling ends); later "
                        "runs replay it, faster. auto: on with CUDA, off on the CPU, where compiling takes "
                        "minutes. Layers streamed from CPU memory or split over GPUs always run uncompiled. Under "
                        "ComfyUI's default cudaMallocAsync allocator the steps compile without CUDA graphs; without "
                        "Triton or on GPUs older than compute capability 7.0 they run uncompiled; a compile that "
                        "fails finishes the run uncompiled. The node says which applies."
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
            return model_files.unknown_model(model)
        return True

    @classmethod
    def execute(cls, model: str, dtype: str, device: str, download_if_missing: bool, quantize: str = "none",
                keep_loaded: bool = True, compile: str = "auto") -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        check_combo("dtype", dtype, list(model_cache.DTYPE_CHOICES))
        check_combo("device", device, model_cache.device_choices())
        check_combo("quantize", quantize, list(QUANTIZE_CHOICES))
        check_combo("compile", compile, list(model_cache.COMPILE_CHOICES))
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
        loaded = model_cache.get_model(model, folder, dtype, device, quantize, keep_loaded,
                                       model_cache.COMPILE_CHOICES[compile])
        # where the weights are (and whether layers stream from CPU memory), after any warning
        lines = [warn_if_slow_on_cpu(loaded.key), loaded.status, model_cache.compile_notice(loaded)]
        show_status(cls.hidden.unique_id, "\n".join(filter(None, lines)))
        return io.NodeOutput(loaded, ui={"text": ["\n".join(filter(None, lines[1:]))]})


def slow_on_cpu_warning(dtype: str, device: str) -> str | None:
    """What to tell someone who runs bf16 or fp16 on the CPU, where few CPUs compute in those types."""
    if device != "cpu" or dtype not in ("bfloat16", "float16"):
        return None
    return (
        f"VILA-U: {dtype} on the CPU is 30-50x slower than float32 (most CPUs have no fast {dtype} kernels; "
        "encoding plus decoding one image took 31 s against 0.7 s). Choose dtype fp32 or auto for CPU runs"
    )


def warn_if_slow_on_cpu(key: model_cache.ModelKey) -> str | None:
    """In the log; returned for the text on the loader node."""
    import logging

    message = slow_on_cpu_warning(key.dtype, key.device)
    if message is not None:
        logging.warning(message)
    return message


class UnloadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VILAU_UnloadModel",
            display_name="VILA-U Unload Model",
            category=CATEGORY,
            description=(
                "Frees the VILA-U model's VRAM and RAM now. Connect what must be finished first (an answer, an "
                "image...) to `value`: this node runs after it and passes it on unchanged, so it can sit in the "
                "middle of a chain. The next VILA-U node that needs the model loads it again."
            ),
            inputs=[
                model_input(),
                io.AnyType.Input("value", optional=True,
                                 tooltip="Anything that must be computed before the model is freed; passed through."),
            ],
            outputs=[io.AnyType.Output(display_name="value", tooltip="The `value` input, unchanged.")],
            not_idempotent=True,  # frees memory every run, even when its inputs come from the cache
            is_output_node=True,  # runs also when nothing is connected to its output
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")  # never equal to itself: ComfyUI runs the node every time

    @classmethod
    def execute(cls, model, value=None) -> io.NodeOutput:
        model.release()
        show_status(cls.hidden.unique_id, model.status)
        return io.NodeOutput(value, ui={"text": [model.status]})
