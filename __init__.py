"""ComfyUI-VILA-U: VILA-U (MIT Han Lab) in ComfyUI.

ComfyUI imports this package, then calls comfy_entrypoint() (V3 node API). The
import itself loads nothing, so that the repository also imports as a plain package
outside ComfyUI (pytest collects it as one); the backend and transformers are
imported only when a node runs.
"""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    from .nodes import VilaUExtension, install_example_inputs, register_folder

    register_folder()  # models/vila-u, after the vila_u paths extra_model_paths.yaml gave
    install_example_inputs()  # the templates' pictures and video, where Load Image / Load Video look
    return VilaUExtension()
