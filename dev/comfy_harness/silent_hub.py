"""A stand-in for the Hugging Face hub that never answers: what a dead HTTPS proxy does.

Used by the download tests (tests/backend/test_downloads.py, tests/comfyui/test_bad_inputs_e2e.py) and by
dev/bench/robustness.py: point HF_ENDPOINT (or `download_repo(endpoint=...)`) at `url`.
"""

from __future__ import annotations

import socket
import threading


class SilentListener:
    """127.0.0.1:<port>: accepts every connection, reads nothing, answers nothing."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)  # kept open: the client waits for an answer

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()
