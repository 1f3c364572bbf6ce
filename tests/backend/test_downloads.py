"""Downloading a published model when the network hangs: a timeout with a clear error, and a
cancel that takes effect at once. The hub is a loopback listener that accepts connections
and never answers (what a dead HTTPS proxy does)."""

from __future__ import annotations

import threading
import time

import pytest

from dev.comfy_harness.silent_hub import SilentListener
from vilau_backend.checkpoint.hub import DownloadFailed, download_repo

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)

REPO = "mit-han-lab/vila-u-7b-256"


@pytest.fixture
def silent_hub():
    listener = SilentListener()
    yield listener
    listener.close()


def test_a_hub_that_never_answers_times_out_with_a_clear_error(silent_hub, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadFailed) as caught:
        download_repo(REPO, tmp_path / "model", ignore_patterns=[], timeout=1.0, endpoint=silent_hub.url)
    elapsed = time.monotonic() - start
    assert "the hub did not answer within 1 s" in str(caught.value), str(caught.value)
    assert "HTTPS_PROXY" in str(caught.value)
    assert silent_hub.connections, "the download never reached the listener"
    assert elapsed < 30, f"a 1 s timeout took {elapsed:.1f} s to surface"


def test_a_cancel_stops_the_wait_within_a_poll_even_before_the_file_list_is_known(silent_hub, tmp_path):
    """What Cancel does in the node: the progress callback raises once the user asked to stop;
    it is called while the hub has not answered at all, with (0, 0)."""
    cancel = threading.Event()
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if cancel.is_set():
            raise KeyboardInterrupt("cancelled")

    cancelled_at: list[float] = []

    def press_cancel() -> None:
        cancelled_at.append(time.monotonic())
        cancel.set()

    threading.Timer(1.0, press_cancel).start()
    with pytest.raises(KeyboardInterrupt):
        download_repo(
            REPO, tmp_path / "model", ignore_patterns=[], on_progress=progress, timeout=60.0, endpoint=silent_hub.url
        )
    latency = time.monotonic() - cancelled_at[0]
    assert silent_hub.connections, "the download never reached the listener"
    assert set(seen) == {(0, 0)} and len(seen) >= 5, seen  # about ten calls a second, nothing known yet
    assert latency < 0.5, f"the wait ended {latency:.2f} s after the cancel (one poll is 0.1 s)"


def test_after_a_cancel_the_next_try_gets_its_own_full_timeout(silent_hub, tmp_path):
    """The cancelled try's worker is still waiting on the hub; the next try on the same folder
    joins it rather than start a second writer, and when that worker times out for the earlier
    request, the next try starts afresh instead of reporting someone else's timeout."""
    folder = tmp_path / "model"
    started = time.monotonic()

    def cancel_soon(done: int, total: int) -> None:
        if time.monotonic() - started > 0.3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        download_repo(REPO, folder, ignore_patterns=[], on_progress=cancel_soon, timeout=2.0, endpoint=silent_hub.url)
    retried = time.monotonic()
    with pytest.raises(DownloadFailed, match="did not answer within 2 s"):
        download_repo(REPO, folder, ignore_patterns=[], timeout=2.0, endpoint=silent_hub.url)
    assert time.monotonic() - retried >= 1.9, "the second try reported the first try's timeout"
    assert len(silent_hub.connections) >= 2


def test_a_model_folder_is_complete_only_with_its_config_and_no_unfinished_download(tmp_path):
    import json

    from vilau_backend.checkpoint.hub import is_complete_download, unfinished_marker

    folder = tmp_path / "vila-u-7b-256"
    folder.mkdir()
    assert not is_complete_download(folder)  # no config.json: not a VILA-U folder yet
    (folder / "config.json").write_text(json.dumps({"model_type": "vila_u"}))
    assert is_complete_download(folder)
    partial = folder / ".cache" / "huggingface" / "download" / "llm" / "model.safetensors.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"")  # what `hf download --local-dir` leaves when interrupted
    assert not is_complete_download(folder)
    partial.unlink()
    unfinished_marker(folder).write_text(REPO)  # ours, beside the folder, while a download runs
    assert unfinished_marker(folder).parent == tmp_path and not is_complete_download(folder)
