"""Reporting from the backend's callbacks to ComfyUI: progress bars, previews, answers on the node, cancel.

Every callback first asks ComfyUI whether the run was interrupted, and raising
there is how the cancel button stops a generation between two positions or two
tokens.
"""

from __future__ import annotations


PREVIEWS_PER_IMAGE = 4  # a partial-grid preview every h/4 rows
# torch.compile itself can't be interrupted: Cancel is read just before compiling and takes effect right
# after (README, Performance, has the measured worst case)
COMPILING = ("compiling… (the first run of this batch size; later runs are faster; Cancel takes effect when "
             "compiling ends)")


def announce_compiling(node_id: str | None, notice: str | None = None) -> None:
    """on_compile: a Cancel pressed before compiling stops the run now, not after it; then "compiling…",
    or the backend's notice when compiling failed and the run goes on uncompiled."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()
    show_status(node_id, notice or COMPILING)


class PositionProgress:
    """on_position callback for image and video generation and the edits: the bar advances one grid
    position at a time, the node shows "position i / n", and a preview of the frame being generated
    comes every few rows. The total is the backend's, as its first report gives it (an edit's kept
    positions count as done at once).

    The text is sent from here, for every node that generates through this callback, rather than
    made by the front-end extension from the bar's progress: then no list of generating nodes has
    to be kept in web/js in step with the Python nodes."""

    def __init__(self, model, node_id: str | None = None):
        self.model = model
        self.node_id = node_id
        h, w = model.config.grid
        self.preview_every = max(1, h // PREVIEWS_PER_IMAGE) * w  # positions between previews
        self.bar = None

    def __call__(self, done: int, total: int, codes_so_far) -> None:
        import comfy.model_management as mm
        import comfy.utils

        mm.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        preview = None
        if done % self.preview_every == 0 or done == total:
            preview = self._preview(codes_so_far)
        self.bar.update_absolute(done, total, preview)
        show_status(self.node_id, position_text(done, total))

    def _preview(self, codes_so_far):
        from comfy.cli_args import args
        from PIL import Image

        from ..vilau_backend.tasks.generate import preview_image

        image = preview_image(self.model, codes_so_far[:1])[0]  # (H, W, 3): the first of the batch
        pixels = image.mul(255).round().clamp(0, 255).byte().numpy()
        return "JPEG", Image.fromarray(pixels), args.preview_size


def position_text(done: int, total: int) -> str:
    return f"position {done} / {total}"


def executing_node_id() -> str | None:
    """The id of the node ComfyUI is running (its execution id, "5:7" inside a subgraph), for the
    callbacks of nodes that do not take the hidden unique_id; None outside a run."""
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    return None if context is None else str(context.node_id)


ANSWER_EVENT = "vilau.answer"  # as web/js/vilau.js: the Q&A nodes' answer box listens for it


class AnswerProgress:
    """Callbacks for understanding: the answers so far are shown on the node while they grow, and
    the bar counts tokens out of max_new_tokens for each pass (one answer, or up to `batch_size`
    answers generated together)."""

    def __init__(self, node_id: str | None, answers: int, max_new_tokens: int, batch_size: int = 1):
        import comfy.utils

        self.node_id = node_id
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.finished: list[str] = []  # answers already complete (one answer at a time)
        self._current: str | None = None  # the answer being generated
        passes = -(-answers // batch_size)
        self.bar = comfy.utils.ProgressBar(passes * max_new_tokens)

    def __call__(self, step: int, token: int, text: str) -> None:
        """on_token: one answer at a time."""
        if step == 0 and self._current is not None:  # a new answer began
            self.finished.append(self._current)
        self._current = text
        self._show(len(self.finished), step, self.finished + [text])

    def on_compile(self, notice: str | None = None) -> None:
        """Before a run that compiles; with a notice when compiling failed and the run went on uncompiled."""
        announce_compiling(self.node_id, notice)

    def on_answers(self, step: int, texts: list[str]) -> None:
        """on_answers: answers generated together; `texts` holds every answer begun so far."""
        self._show((len(texts) - 1) // self.batch_size, step, texts)

    def _show(self, passes_done: int, step: int, texts: list[str]) -> None:
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
        send_answer(self.node_id, texts, done=False)
        self.bar.update_absolute(passes_done * self.max_new_tokens + step + 1)

    def done(self, answers: list[str]) -> None:
        """The final answers (answers that ended early leave the bar short: fill it)."""
        self.bar.update_absolute(self.bar.total)
        send_answer(self.node_id, answers, done=True)


def send_answer(node_id: str | None, answers: list[str], done: bool) -> None:
    """The answer so far, to the node's answer box (web/js/vilau.js).

    A message of the pack's own rather than the core progress text: newer front ends
    remove every node's progress-text box when a job resets, and the answer must stay.
    API clients read the same message: {"node", "prompt_id", "text", "answers", "done"}."""
    if node_id is None:
        return
    from server import PromptServer

    server = PromptServer.instance
    message = {
        "node": node_id,
        "prompt_id": getattr(server, "last_prompt_id", None),
        "text": format_answers(answers),
        "answers": list(answers),
        "done": done,
    }
    server.send_sync(ANSWER_EVENT, message, server.client_id)


def format_answers(answers: list[str]) -> str:
    if len(answers) == 1:
        return answers[0]
    return "\n\n".join(f"[{i + 1}] {text}" for i, text in enumerate(answers))


class CaptionProgress:
    """on_progress callback for VILA-U Caption Folder: the bar counts tokens of every image (each
    image counts max_new_tokens, filled when its caption is written), and the node shows the
    captions of the current batch as they grow, each under its file name."""

    def __init__(self, node_id: str | None, max_new_tokens: int):
        self.node_id = node_id
        self.max_new_tokens = max_new_tokens
        self.bar = None  # made at the first event, when the number of images is known

    def on_compile(self, notice: str | None = None) -> None:
        """Before a run that compiles; with a notice when compiling failed and the run went on uncompiled."""
        announce_compiling(self.node_id, notice)

    def __call__(self, event) -> None:
        """The backend's CaptionEvent (vilau_backend/tasks/captioning.py)."""
        import comfy.model_management as mm
        import comfy.utils

        mm.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(max(1, event.total * self.max_new_tokens))
        self.bar.update_absolute((event.done * self.max_new_tokens) + (event.step + 1) * len(event.images))
        if event.images:
            lines = [f"{image.name}: {text}" for image, text in zip(event.images, event.texts)]
            send_answer(self.node_id, [f"{event.done} of {event.total} images done\n" + "\n".join(lines)], done=False)


def show_status(node_id: str | None, text: str) -> None:
    """A line of status on a node (core progress text: the front end shows it on the node until the next run)."""
    if node_id is None or not text:
        return
    from server import PromptServer

    PromptServer.instance.send_progress_text(text, node_id)
