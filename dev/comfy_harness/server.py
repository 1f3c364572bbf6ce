"""Run a real ComfyUI headless, for the end-to-end tests and the scripts.

Plain helper module (no pytest in here). Typical use::

    from dev.comfy_harness.server import ComfyServer, comfyui_dir

    srv = ComfyServer(comfyui_dir(), run_dir=tmp, custom_nodes={"ComfyUI-VILA-U": repo_root})
    srv.start()                      # returns once /system_stats answers
    assert not srv.import_failed("ComfyUI-VILA-U"), srv.log_tail()
    pid = srv.queue(prompt)          # API-format graph; PromptRejected on validation errors
    entry = srv.wait(pid, timeout=120)  # /history entry; ExecutionFailed on a node error
    srv.stop()

Layout under ``run_dir`` (all created here; ComfyUI is started with
``--base-directory run_dir`` so nothing from the ComfyUI checkout's own
custom_nodes/ or models/ leaks in):

    custom_nodes/<name> -> symlink to each pack to load
    models/             folder_paths.models_dir (put test checkpoints here)
    input/ output/ temp/ user/
    comfyui.log         stdout+stderr of the server

ComfyUI 0.3.75 facts this relies on (see nodes.py / server.py / execution.py):
- custom node packs are loaded from every folder of
  ``folder_paths.get_folder_paths("custom_nodes")``; a symlinked folder keeps
  the link's name as its module name;
- after loading it logs ``"{secs:6.1f} seconds (IMPORT FAILED): {module_path}"``
  for each pack that failed (import error, or a V3 ``comfy_entrypoint`` that
  raised / did not return a ComfyExtension);
- the HTTP server only starts listening after all nodes are loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]

_IMPORT_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?) seconds( \(IMPORT FAILED\))?: (.+?)\s*$")
_BUILTIN_FAILED = re.compile(r"^IMPORT FAILED: (.+?)\s*$")


def comfyui_dir() -> Path:
    """ComfyUI location: $COMFYUI_DIR, else <repo>/.cache/comfyui."""
    env = os.environ.get("COMFYUI_DIR")
    return Path(env).resolve() if env else REPO_ROOT / ".cache" / "comfyui"


def missing_comfyui_message(path: Path) -> str:
    return (
        f"ComfyUI not found at {path} (no main.py). Install the pinned copy with\n"
        f"    bash .ci/install_comfyui.sh {path} <venv>\n"
        f"or point COMFYUI_DIR at an existing ComfyUI 0.3.75 checkout."
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    """Base class of the errors raised here."""


class ServerStartError(ComfyError):
    pass


class PromptRejected(ComfyError):
    """POST /prompt refused the graph (validation). ``node_errors`` is ComfyUI's dict."""

    def __init__(self, error: Any, node_errors: dict, status: int):
        self.error = error
        self.node_errors = node_errors or {}
        self.status = status
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [f"ComfyUI rejected the prompt (HTTP {self.status}): {_fmt_error(self.error)}"]
        for node_id, info in self.node_errors.items():
            lines.append(f"  node {node_id} ({info.get('class_type')}):")
            for err in info.get("errors", []):
                lines.append(f"    - {err.get('type')}: {err.get('message')} [{err.get('details')}]")
        return "\n".join(lines)


class ExecutionFailed(ComfyError):
    """The prompt ran and ended with status 'error'. ``entry`` is the /history entry."""

    def __init__(self, prompt_id: str, entry: dict, log_tail: str = ""):
        self.prompt_id = prompt_id
        self.entry = entry
        self.error = execution_error(entry) or {}
        self.interrupted = was_interrupted(entry)
        if self.interrupted:
            msg = f"prompt {prompt_id} was interrupted"
        else:
            e = self.error
            msg = (
                f"prompt {prompt_id} failed in node {e.get('node_id')} ({e.get('node_type')}): "
                f"{e.get('exception_type')}: {e.get('exception_message')}\n"
                + "".join(e.get("traceback") or [])
            )
        if log_tail:
            msg += "\n--- server log tail ---\n" + log_tail
        super().__init__(msg)


def _fmt_error(err: Any) -> str:
    if isinstance(err, dict):
        return f"{err.get('type')}: {err.get('message')} {err.get('details') or ''}".strip()
    return str(err)


def _messages(entry: dict) -> list:
    return ((entry or {}).get("status") or {}).get("messages") or []


def execution_error(entry: dict) -> dict | None:
    """The data of the ``execution_error`` message of a /history entry, if any."""
    for name, data in _messages(entry):
        if name == "execution_error":
            return data
    return None


def was_interrupted(entry: dict) -> bool:
    return any(name == "execution_interrupted" for name, _ in _messages(entry))


def status_str(entry: dict) -> str | None:
    """'success' or 'error' (None while unknown)."""
    return ((entry or {}).get("status") or {}).get("status_str")


class Cancelled(NamedTuple):
    """What ComfyServer.cancel_during_progress saw."""

    entry: dict  # the prompt's /history entry
    stopped_after: float  # seconds from Cancel to the prompt's end
    progress: list[int]  # the progress values the node sent, in order


class ComfyServer:
    """One ComfyUI server process."""

    def __init__(
        self,
        comfy_dir: str | os.PathLike | None,
        run_dir: str | os.PathLike,
        custom_nodes: Mapping[str, str | os.PathLike],
        *,
        extra_model_paths: str | os.PathLike | None = None,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        cpu: bool = True,
        offline: bool = True,
    ):
        """
        custom_nodes: {folder name: source dir}; each is symlinked into <run_dir>/custom_nodes/.
        extra_model_paths: an extra_model_paths.yaml to pass with
            --extra-model-paths-config.
        cpu: run with --cpu (the tests); False lets ComfyUI use a GPU (the demo).
        offline: set HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 for the server (False: the
            download tests, against a local stand-in for the hub).

        The server runs with --disable-api-nodes (faster start, no comfy.org nodes; the front end then
        makes no calls to the internet), under $COMFYUI_PYTHON or this Python.
        """
        self.comfy_dir = Path(comfy_dir) if comfy_dir else comfyui_dir()
        if not (self.comfy_dir / "main.py").is_file():
            raise ServerStartError(missing_comfyui_message(self.comfy_dir))
        self.run_dir = Path(run_dir).resolve()
        self.custom_nodes = {str(k): Path(v).resolve() for k, v in custom_nodes.items()}
        self.python = os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.port: int | None = None
        self.extra_model_paths = Path(extra_model_paths).resolve() if extra_model_paths else None
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cpu = cpu
        self.offline = offline

        self.custom_nodes_dir = self.run_dir / "custom_nodes"
        self.models_dir = self.run_dir / "models"
        self.input_dir = self.run_dir / "input"
        self.output_dir = self.run_dir / "output"
        self.temp_root = self.run_dir / "temp"  # ComfyUI appends "temp" to --temp-directory
        self.temp_dir = self.temp_root / "temp"
        self.user_dir = self.run_dir / "user"
        self.log_path = self.run_dir / "comfyui.log"

        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.session = requests.Session()
        self.start_seconds: float | None = None

    # ----------------------------------------------------------------- process
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            self.python, "main.py",
            *(["--cpu"] if self.cpu else []),
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--disable-auto-launch",
            "--base-directory", str(self.run_dir),
            "--output-directory", str(self.output_dir),
            "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.temp_root),
            "--user-directory", str(self.user_dir),
            "--database-url", "sqlite:///:memory:",
            "--disable-api-nodes",
        ]
        if self.extra_model_paths:
            cmd += ["--extra-model-paths-config", str(self.extra_model_paths)]
        return cmd + self.extra_args

    def _prepare_dirs(self) -> None:
        for d in (self.custom_nodes_dir, self.models_dir, self.input_dir, self.output_dir,
                  self.temp_root, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        for name, src in self.custom_nodes.items():
            if not src.is_dir():
                raise ServerStartError(f"custom node source {src} is not a folder")
            link = self.custom_nodes_dir / name
            if link.is_symlink() or link.exists():
                if link.is_symlink() and link.resolve() == src:
                    continue
                if link.is_symlink() or link.is_file():
                    link.unlink()
                else:
                    shutil.rmtree(link)
            link.symlink_to(src, target_is_directory=True)

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if self.proc is not None:
            raise ServerStartError("already started")
        self._prepare_dirs()
        self.port = free_port()
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
        if self.offline:
            env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        env.update(self.env)
        self._log_file = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), cwd=self.comfy_dir, env=env,
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self._close_log()
                self.proc = None
                raise ServerStartError(
                    f"ComfyUI exited with code {rc} before answering\n{self.log_tail()}")
            try:
                r = self.session.get(self.url + "/system_stats", timeout=2)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"ComfyUI did not answer on {self.url} within {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.25)
        self.start_seconds = time.monotonic() - t0
        return self

    def __enter__(self) -> "ComfyServer":
        """`with pack_server(...) as srv:` starts the server (180 s to answer) and stops it after."""
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGINT)  # ComfyUI catches KeyboardInterrupt, cleans temp
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._close_log()
        self.session.close()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --------------------------------------------------------------------- log
    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def custom_node_import_status(self) -> dict[str, bool]:
        """{pack folder name: imported ok} from the 'Import times for custom nodes' table."""
        out: dict[str, bool] = {}
        for line in self.log_text().splitlines():
            m = _IMPORT_LINE.match(line)
            if m:
                out[os.path.basename(m.group(3).rstrip("/\\"))] = m.group(2) is None
        return out

    def import_failed(self, pack_name: str) -> bool:
        """True if ComfyUI logged ``(IMPORT FAILED)`` for this pack (or never listed it)."""
        return not self.custom_node_import_status().get(pack_name, False)

    def builtin_import_failures(self) -> list[str]:
        """comfy_extras / comfy_api_nodes files logged as ``IMPORT FAILED: <file>``
        (with this venv: nodes_audio.py and nodes_audio_encoder.py, no torchaudio)."""
        return [m.group(1) for line in self.log_text().splitlines()
                if (m := _BUILTIN_FAILED.match(line.strip()))]

    # -------------------------------------------------------------------- http
    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        r = self.session.get(self.url + path, **kw)
        r.raise_for_status()
        return r

    def post(self, path: str, payload: Any = None, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.session.post(self.url + path, json=payload if payload is not None else {}, **kw)

    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (all nodes) or /object_info/{node_class} (that node's entry)."""
        if node_class is None:
            return self.get("/object_info", timeout=120).json()
        return self.get(f"/object_info/{node_class}").json().get(node_class, {})

    def queue(self, prompt: Mapping, *, client_id: str | None = None, strict: bool = True) -> str:
        """POST /prompt with an API-format graph ({node_id: {"class_type", "inputs"}}).

        Returns the prompt_id. Raises PromptRejected (HTTP 400) with ComfyUI's
        ``error`` and ``node_errors``; with strict, also when the prompt was
        queued but some output nodes were dropped for errors.
        """
        payload: dict[str, Any] = {"prompt": prompt, "prompt_id": str(uuid.uuid4())}
        if client_id is not None:
            payload["client_id"] = client_id
        r = self.post("/prompt", payload)
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text, "node_errors": {}}
        if r.status_code != 200:
            raise PromptRejected(body.get("error"), body.get("node_errors"), r.status_code)
        if strict and body.get("node_errors"):
            raise PromptRejected("some outputs were dropped", body["node_errors"], r.status_code)
        return body["prompt_id"]

    def history(self, prompt_id: str | None = None) -> dict:
        return self.get(f"/history/{prompt_id}" if prompt_id else "/history").json()

    def queue_state(self) -> dict:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}."""
        return self.get("/queue").json()

    def is_running(self, prompt_id: str) -> bool:
        return any(item[1] == prompt_id for item in self.queue_state()["queue_running"])

    def wait(self, prompt_id: str, timeout: float = 300.0, *, check: bool = True) -> dict:
        """Poll /history/{prompt_id} until the prompt is done; return its entry
        ({"prompt", "outputs": {node_id: ui dict}, "status": {"status_str",
        "completed", "messages"}, "meta"}). With check, raise ExecutionFailed when
        status_str is 'error' (a node raised, or the run was interrupted)."""
        deadline = time.monotonic() + timeout
        while True:
            hist = self.history(prompt_id)
            if prompt_id in hist:
                entry = hist[prompt_id]
                if check and status_str(entry) != "success":
                    raise ExecutionFailed(prompt_id, entry, self.log_tail(30))
                return entry
            if not self.running():
                raise ComfyError(f"server died while waiting for {prompt_id}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"prompt {prompt_id} not done after {timeout:.0f} s; queue: "
                    f"{json.dumps(self.queue_state())[:500]}\n{self.log_tail(30)}")
            time.sleep(0.2)

    def run(self, prompt: Mapping, timeout: float = 300.0, **queue_kw) -> dict:
        """queue() then wait()."""
        return self.wait(self.queue(prompt, **queue_kw), timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt (global, or only if prompt_id is the one running)."""
        r = self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        r.raise_for_status()

    def cancel_during_progress(self, prompt: Mapping, node_id: str, timeout: float = 120.0) -> "Cancelled":
        """Queue `prompt`, press Cancel (POST /interrupt) once node `node_id` reports progress, and wait up
        to 60 s for the prompt to end; `timeout`: how long the progress may take to come."""
        node_id = str(node_id)
        with self.websocket() as ws:
            pid = self.queue(prompt, client_id=ws.client_id)
            ws.wait_for(lambda m: m.get("type") == "progress" and m["data"]["node"] == node_id
                        and m["data"]["prompt_id"] == pid, timeout=timeout)
            t0 = time.monotonic()
            self.interrupt()
            entry = self.wait(pid, timeout=60, check=False)
            stopped_after = time.monotonic() - t0
            progress = [m["data"]["value"] for m in ws.of_type("progress") if m["data"]["node"] == node_id]
        return Cancelled(entry, stopped_after, progress)

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free (takes effect when the worker is next idle)."""
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory}).raise_for_status()

    # ------------------------------------------------------------------ files
    def output_files(self, entry: dict, node_id: str | None = None) -> list[Path]:
        """Absolute paths of files listed in a history entry's outputs
        (``images``/``gifs``/``audio``... items with filename/subfolder/type)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        paths = []
        for nid, ui in (entry.get("outputs") or {}).items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for value in ui.values():
                if not isinstance(value, list):
                    continue
                for item in value:
                    if isinstance(item, dict) and "filename" in item:
                        root = roots.get(item.get("type", "output"), self.output_dir)
                        paths.append(root / item.get("subfolder", "") / item["filename"])
        return paths

    def ui_text(self, entry: dict, node_id: str) -> list[str]:
        """The ``text`` list a node put in its ui (PreviewAny, ui.PreviewText)."""
        return list((entry.get("outputs") or {}).get(str(node_id), {}).get("text", []))

    def put_input(self, src: str | os.PathLike, name: str | None = None) -> str:
        """Copy a file into the input folder; returns the name LoadImage expects."""
        name = name or Path(src).name
        shutil.copyfile(src, self.input_dir / name)
        return name

    def websocket(self, client_id: str | None = None) -> "WSRecorder":
        """Open /ws and record its messages (pass the same client_id to queue())."""
        return WSRecorder(self.url, client_id or uuid.uuid4().hex)


PACK = "ComfyUI-VILA-U"  # the folder name ComfyUI loads this checkout under


def pack_server(
    run_dir: Path, small_model: str | None, *, extra_model_paths: Path | None = None, cpu: bool = True
) -> ComfyServer:
    """A ComfyServer (not started) with this checkout loaded as the pack and, unless None, a small random
    VILA-U model named `small_model` written into its models/vila-u; cpu=False lets ComfyUI use a GPU.

    With a small model the server gets one intra-op thread: small models gain nothing from more,
    and on a small machine shared with other torch processes spinning OpenMP workers slow every
    step down by orders of magnitude."""
    env = None
    if small_model is not None:
        from vilau_backend.testing.random_checkpoint import write_random_checkpoint

        write_random_checkpoint(Path(run_dir) / "models" / "vila-u" / small_model)
        env = {"OMP_NUM_THREADS": "1"}
    return ComfyServer(comfyui_dir(), run_dir, {PACK: REPO_ROOT}, extra_model_paths=extra_model_paths, env=env, cpu=cpu)



def pack_server_fixture(small_model: str):
    """A module-scoped pytest fixture for a test module that needs nothing but pack_server with the
    small random model `small_model`, started once for the module: `server = cs.pack_server_fixture(NAME)`."""
    import pytest

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        with pack_server(tmp_path_factory.mktemp("run"), small_model) as srv:
            yield srv

    return server

class WSRecorder:
    """Records the /ws stream in a background thread (uses aiohttp, a ComfyUI
    requirement). ``messages``: list of dicts {"type", "data"} for JSON messages;
    binary frames become {"type": "binary", "event": int, "data": bytes}.
    Binary event 3 (TEXT) is ``send_progress_text``: see ``progress_texts``; the Q&A nodes'
    answers: see ``answer_texts``."""

    def __init__(self, base_url: str, client_id: str):
        import asyncio

        import aiohttp

        self.client_id = client_id
        self.messages: list[dict] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: Any = None
        self._error: BaseException | None = None
        url = base_url.replace("http://", "ws://") + f"/ws?clientId={client_id}"

        async def main():
            self._stop = asyncio.Event()
            try:
                async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
                    self._ready.set()
                    reader = asyncio.ensure_future(self._read(ws, aiohttp))
                    await self._stop.wait()
                    reader.cancel()
            except BaseException as e:  # noqa: BLE001 - reported in wait_for
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._error:
            raise ComfyError(f"websocket connect failed: {self._error!r}")

    async def _read(self, ws, aiohttp) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                item = json.loads(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                item = {"type": "binary", "event": int.from_bytes(msg.data[:4], "big"), "data": msg.data[4:]}
            else:
                continue
            with self._lock:
                self.messages.append(item)

    def of_type(self, msg_type: str) -> list[dict]:
        with self._lock:
            return [m for m in self.messages if m.get("type") == msg_type]

    def progress_texts(self, node_id: str | None = None) -> list[str]:
        """Texts sent with PromptServer.send_progress_text (binary event 3:
        4-byte big-endian node-id length, node id, utf-8 text)."""
        out = []
        with self._lock:
            frames = [m for m in self.messages if m.get("type") == "binary" and m["event"] == 3]
        for m in frames:
            data = m["data"]
            n = int.from_bytes(data[:4], "big")
            nid, text = data[4:4 + n].decode(), data[4 + n:].decode("utf-8", "replace")
            if node_id is None or nid == str(node_id):
                out.append(text)
        return out

    def answer_texts(self, node_id: str) -> list[str]:
        """Answers so far that a VILA-U Q&A node sent to its answer box ("vilau.answer" messages)."""
        return [m["data"]["text"] for m in self.of_type("vilau.answer") if m["data"]["node"] == str(node_id)]

    def wait_for(self, pred, timeout: float = 30.0) -> dict:
        """Block until a recorded message satisfies pred(msg); return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for m in self.messages:
                    if pred(m):
                        return m
            time.sleep(0.05)
        raise TimeoutError("no matching websocket message")

    def close(self) -> None:
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> "WSRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
