"""Drive a real ComfyUI with this pack loaded: start it headless, queue graphs, read results,
open its front end in Chromium.

Used by the tests (tests/) and by dev/scripts/demo.py and dev/scripts/build_workflows.py, all run from
the repository root. Not part of the node pack: ComfyUI never imports it.

- `server`: one ComfyUI process (ComfyServer), `pack_server` for this pack with a small random model,
  the websocket recorder.
- `workflow_api`: UI-format workflows (example_workflows/*.json) to API-format prompts, as the front end
  converts them, and the example inputs the templates load.
- `browser`: the front end in headless Chromium (Playwright), for the browser tests and the
  template builder.
- `silent_hub`: a stand-in Hugging Face hub that accepts connections and never answers, for
  the download tests.
"""
