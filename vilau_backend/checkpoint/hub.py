"""Downloading a published model from the Hugging Face Hub: bounded in time, stoppable at any moment.

huggingface_hub's `snapshot_download` lists a repository with requests that have no read
timeout (0.x through 2.x), so a network that accepts connections and never answers holds
it for ever. Here the listing is one `repo_info` call with an explicit timeout, and every
file is one `hf_hub_download` (metadata request bounded by `etag_timeout`, content reads by
huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT). The files download in a worker thread; the
calling thread only waits, polling its own `on_progress` callback every POLL_SECONDS, so a
callback that raises (a cancel) returns control within that time whatever the network does.
The worker then stops at its next chance: before the next file, or inside a file where
huggingface_hub accepts a progress class (2.x). Progress is read from the bytes on disk,
which works with every huggingface_hub version.

A published model downloads into a model folder through `download_published`, which marks the
folder unfinished until every file is there (`is_complete_download`), so an interrupted download
is resumed rather than taken for a model.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, VilaUError
from .config import is_vila_u_folder
from .published import FILES_HINT

POLL_SECONDS = 0.1  # how often the waiting thread calls on_progress
PARTIAL_DIR = Path(".cache") / "huggingface" / "download"  # where hf_hub_download(local_dir=...) keeps partial files

Progress = Callable[[int, int], None]  # (bytes done, bytes in total; 0 while unknown); raising stops the wait
# published repositories may carry other copies of the weights; the loader reads safetensors
IGNORED_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx"]


class DownloadStopped(Exception):
    """Raised inside the worker when the download was abandoned."""


class DownloadFailed(VilaUError):
    """The hub could not be reached, did not answer in time, or refused; `reason` says which."""

    def __init__(self, repo_id: str, reason: str):
        self.reason = reason
        super().__init__(f"could not download {repo_id}: {reason}")


@dataclass
class _Download:
    repo_id: str
    folder: Path
    files: dict[str, int] = field(default_factory=dict)  # name -> size in bytes
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def bytes_done(self) -> int:
        done = sum(size for name, size in self.files.items() if (self.folder / name).is_file())
        partial = self.folder / PARTIAL_DIR
        if partial.is_dir():
            done += sum(p.stat().st_size for p in partial.rglob("*.incomplete") if p.is_file())
        return done


_ACTIVE: dict[Path, _Download] = {}  # folder -> the download writing into it
_ACTIVE_LOCK = threading.Lock()


def download_repo(
    repo_id: str, folder: Path, *, ignore_patterns: list[str], on_progress: Progress | None = None,
    timeout: float | None = None, endpoint: str | None = None,
) -> None:
    """Download `repo_id` into `folder` (resuming partial files). Returns when every file is there;
    raises DownloadFailed when the hub cannot be reached or a metadata request gets no answer within
    `timeout` seconds (default: huggingface_hub's HF_HUB_ETAG_TIMEOUT, 10 s unless set), and re-raises
    whatever `on_progress` raises (the worker is told to stop). `endpoint`: default HF_ENDPOINT."""
    from huggingface_hub import constants

    folder = Path(folder).resolve()
    timeout = float(timeout or constants.HF_HUB_ETAG_TIMEOUT)
    for _ in range(2):  # a worker this call attached to may fail for its own, earlier request: retry once
        download, attached = _attach_or_start(repo_id, folder, ignore_patterns, timeout, endpoint)
        try:
            while download.thread.is_alive():
                download.thread.join(POLL_SECONDS)
                if on_progress is not None:
                    on_progress(download.bytes_done(), sum(download.files.values()))
        except BaseException:
            download.stop.set()
            raise
        if download.error is None or not attached:
            break
    if download.error is not None:
        raise DownloadFailed(repo_id, failure_reason(download.error, timeout)) from download.error


def _attach_or_start(
    repo_id: str, folder: Path, ignore_patterns: list[str], timeout: float, endpoint: str | None
) -> tuple[_Download, bool]:
    """The download writing into `folder`, and whether it was already running (attached)."""
    # a download abandoned by a cancel may still be finishing a file: carry on with it
    # rather than start a second writer into the same folder
    with _ACTIVE_LOCK:
        running = _ACTIVE.get(folder)
        if running is not None and running.thread.is_alive() and running.repo_id == repo_id:
            running.stop.clear()
            return running, True
        download = _Download(repo_id, folder)
        download.thread = threading.Thread(
            target=_run, args=(download, ignore_patterns, timeout, endpoint), name=f"download {repo_id}", daemon=True
        )
        _ACTIVE[folder] = download
        download.thread.start()
        return download, False


def _run(download: _Download, ignore_patterns: list[str], timeout: float, endpoint: str | None) -> None:
    try:
        from huggingface_hub import HfApi, hf_hub_download

        info = HfApi(endpoint=endpoint).repo_info(download.repo_id, files_metadata=True, timeout=timeout)
        download.files = {
            s.rfilename: s.size or 0 for s in info.siblings
            if not any(fnmatch.fnmatch(s.rfilename, pattern) for pattern in ignore_patterns)
        }
        extra = {"tqdm_class": _stoppable_tqdm(download.stop)} if _accepts_tqdm_class(hf_hub_download) else {}
        for name in download.files:
            if download.stop.is_set():
                raise DownloadStopped(download.repo_id)
            hf_hub_download(
                download.repo_id, name, revision=info.sha, local_dir=str(download.folder), etag_timeout=timeout,
                endpoint=endpoint, **extra,
            )
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
        download.error = exc


def _accepts_tqdm_class(function) -> bool:
    return "tqdm_class" in inspect.signature(function).parameters


def _stoppable_tqdm(stop: threading.Event):
    from huggingface_hub.utils import tqdm as hf_tqdm

    class StoppableTqdm(hf_tqdm):
        def update(self, n=1):
            if stop.is_set():
                raise DownloadStopped("download stopped")
            return super().update(n)

    return StoppableTqdm


def failure_reason(error: BaseException, timeout: float) -> str:
    if _is_timeout(error):
        return (
            f"the hub did not answer within {timeout:g} s (a network or proxy that accepts connections but never "
            "replies: check the connection, HTTPS_PROXY and HF_ENDPOINT)"
        )
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def _is_timeout(error: BaseException | None) -> bool:
    seen = 0
    while error is not None and seen < 10:  # the timeout may be wrapped by huggingface_hub's own errors
        if isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower():
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


# ---- a published model in a model folder ----------------------------------------------------


def is_complete_download(folder: Path) -> bool:
    """A VILA-U folder with no unfinished download in it: neither ours (the marker next to it) nor one
    of `hf download --local-dir` (its partial files end in .incomplete)."""
    return not unfinished_marker(folder).exists() and has_all_files(folder)


def has_all_files(folder: Path) -> bool:
    return is_vila_u_folder(folder) and not any((folder / ".cache" / "huggingface").glob("**/*.incomplete"))


def unfinished_marker(folder: Path) -> Path:
    # next to the folder, not in it: snapshot_download treats any non-empty folder as a finished
    # download when the hub cannot be reached
    return folder.parent / f".{folder.name}.unfinished-download"


def download_published(repo_id: str, folder: Path, progress: Progress | None = None) -> None:
    """Download a published model into `folder`, resuming what an earlier try left. `progress(done, total)`
    (bytes; total 0 while the file list is not known yet) is called about ten times a second from this
    thread whatever the network does; if it raises, the wait ends at once and the exception propagates."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:
        raise CheckpointError(
            f"downloading {repo_id} needs huggingface_hub", hint="install it with `pip install huggingface_hub`"
        ) from exc
    folder.mkdir(parents=True, exist_ok=True)
    unfinished_marker(folder).write_text(f"{repo_id}\n", encoding="utf-8")
    try:
        download_repo(repo_id, folder, ignore_patterns=IGNORED_PATTERNS, on_progress=progress)
    except DownloadFailed as exc:
        raise _download_failed(repo_id, folder, exc.reason) from exc
    if not has_all_files(folder):
        raise _download_failed(repo_id, folder, "the download ended but the folder is still incomplete")
    unfinished_marker(folder).unlink()


def _download_failed(repo_id: str, folder: Path, reason: str) -> CheckpointError:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        reason = f"HF_HUB_OFFLINE is set, so nothing can be downloaded ({reason})"
    return CheckpointError(
        f"could not download {repo_id} into {folder}: {reason}",
        hint=f"run `hf download {repo_id} --local-dir \"{folder}\"` (`huggingface-cli download` with older "
        "huggingface_hub) on a machine with internet access (an interrupted download resumes), or put the files "
        f"of https://huggingface.co/{repo_id} there by hand: {FILES_HINT}",
    )
