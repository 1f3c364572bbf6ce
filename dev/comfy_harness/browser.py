"""ComfyUI's real front end in headless Chromium, driven with Playwright.

Plain helper module (no pytest in here), used by tests/comfyui/test_browser.py and by
dev/scripts/build_workflows.py. Typical use::

    from dev.comfy_harness.browser import ComfyPage, chromium_path

    with ComfyPage(server.url, screenshot_dir=tmp) as page:   # opens the page, waits for the app
        page.load_workflow(ui_json)          # app.loadGraphData, as opening a file does
        page.set_widget(node_id, "model", "vila-u-small")
        prompt_id = page.queue()             # app.queuePrompt, as the Queue button does
        page.screenshot("name")              # <screenshot_dir>/name.png

Chromium is Debian's (``/usr/bin/chromium``, ``apt-get install chromium``);
Playwright never downloads a browser here. The flags keep a headless Chromium from
reaching the network or a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]

# front-end settings for a clean, quiet first start (written to <user>/default/comfy.settings.json)
QUIET_SETTINGS = {
    "Comfy.TutorialCompleted": True,  # no template browser on the first visit
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Validation.Workflows": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
}


ROOT_GRAPH = "(window.app.rootGraph ?? window.app.graph)"
# newer front ends keep node ids as strings ("3"), older ones as numbers (3): look up either
NODE_BY_ID = f"((id) => {ROOT_GRAPH}.getNodeById(id) ?? {ROOT_GRAPH}.getNodeById(String(id)))"


def chromium_path() -> str | None:
    """The Chromium to drive: $CHROMIUM, else Debian's /usr/bin/chromium."""
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


# The front ends the browser tests run: the pinned ComfyUI's own (its requirements.txt pins
# comfyui-frontend-package 1.32.9) and the newest on PyPI, served by the same pinned backend with
# --front-end-root. dev/scripts/run_tests.sh extracts the newest one into .cache/frontend/<version>/.
NEWEST_FRONT_END = os.environ.get("VILAU_NEWEST_FRONT_END", "1.58.1")


def front_end_root(version: str) -> Path:
    """Where dev/scripts/run_tests.sh puts the static files of comfyui-frontend-package==version."""
    return Path(__file__).resolve().parents[2] / ".cache" / "frontend" / version / "static"


def front_end_args(front_end: str) -> list[str]:
    """ComfyUI arguments that serve a front end: "pinned" (the one ComfyUI installed) or a version."""
    if front_end == "pinned":
        return []
    root = front_end_root(front_end)
    if not (root / "index.html").is_file():
        raise FileNotFoundError(
            f"no comfyui-frontend-package {front_end} at {root}: run dev/scripts/run_tests.sh, which downloads "
            "the wheel and extracts its static folder there"
        )
    return ["--front-end-root", str(root)]


def write_quiet_settings(user_dir: Path) -> None:
    settings = user_dir / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
    settings.write_text(json.dumps({**current, **QUIET_SETTINGS}, indent=2), encoding="utf-8")


class ComfyPage:
    """One Chromium with one tab on a running ComfyUI."""

    def __init__(self, url: str, screenshot_dir: str | Path | None = None, viewport=(1600, 1000)):
        self.url = url
        self.screenshot_dir = Path(screenshot_dir) if screenshot_dir else None
        self.viewport = viewport
        self.console: list[str] = []  # console messages and page errors, for failure messages
        self._profile: str | None = None
        self._playwright = None
        self._browser = None
        self.page = None

    # ------------------------------------------------------------------ lifecycle
    def open(self, timeout: float = 90.0) -> "ComfyPage":
        from playwright.sync_api import sync_playwright

        executable = chromium_path()
        if executable is None:
            raise RuntimeError("no Chromium: install Debian's `chromium` (apt-get install chromium) or set $CHROMIUM")
        self._profile = tempfile.mkdtemp(prefix="vilau-chromium-")  # an empty --user-data-dir
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch_persistent_context(
            self._profile, executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": self.viewport[0], "height": self.viewport[1]},
        )
        # the "Nodes 2.0" banner would cover the top of the canvas in screenshots
        self._browser.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self.page = self._browser.pages[0] if self._browser.pages else self._browser.new_page()
        self.page.on("console", lambda m: self.console.append(f"console.{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=timeout * 1000)
        self._wait_for_app(timeout)
        return self

    def _wait_for_app(self, timeout: float) -> None:
        # the app is ready when the graph exists and every extension (ours too) has been set up
        self.page.wait_for_function(
            "() => window.app && GRAPH && window.app.canvas && window.app.vueAppReady".replace("GRAPH", ROOT_GRAPH),
            timeout=timeout * 1000,
        )

    def reload(self, timeout: float = 90.0) -> None:
        """Reload the page as a person pressing F5 does: the front end restores the open workflow."""
        self.page.reload(wait_until="domcontentloaded", timeout=timeout * 1000)
        self._wait_for_app(timeout)
        self.page.wait_for_timeout(500)  # the restored workflow is configured after the app is ready

    def close(self) -> None:
        for thing in (self._browser, self._playwright):
            try:
                if thing is self._playwright and thing is not None:
                    thing.stop()
                elif thing is not None:
                    thing.close()
            except Exception:  # noqa: BLE001 - closing after a failure
                pass
        self._browser = self._playwright = None
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def __enter__(self) -> "ComfyPage":
        return self.open() if self.page is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ graph
    def evaluate(self, script: str, arg: Any = None) -> Any:
        """Run a JS function in the page. In it, NODE(id) is the node of that id, number or string,
        and GRAPH the root graph (app.rootGraph in newer front ends, app.graph, its deprecated
        name, in older ones)."""
        return self.page.evaluate(script.replace("NODE(", NODE_BY_ID + "(").replace("GRAPH", ROOT_GRAPH), arg)

    def front_end_version(self) -> str:
        return self.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")

    def extensions(self) -> list[str]:
        """Names of the registered front-end extensions."""
        return self.evaluate("() => window.app.extensions.map(e => e.name)")

    def load_workflow(self, workflow: dict) -> None:
        """Open a UI-format workflow as the front end does for a dropped or opened file."""
        self.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, null); }", workflow)
        self.page.wait_for_timeout(300)

    def serialize(self) -> dict:
        """The graph as the front end saves it (UI format)."""
        return self.evaluate("() => GRAPH.serialize()")

    def nodes(self) -> list[dict]:
        """[{id, type, mode, title, widgets: {name: value}}] of the current graph."""
        return self.evaluate(
            """() => GRAPH._nodes.map(n => ({
                id: /^\\d+$/.test(String(n.id)) ? Number(n.id) : n.id, type: n.type, mode: n.mode, title: n.title,
                widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value])),
            }))"""
        )

    def set_widget(self, node_id: int, name: str, value: Any) -> None:
        ok = self.evaluate(
            """([id, name, value]) => {
                const node = NODE(id);
                const widget = node?.widgets?.find(w => w.name === name);
                if (!widget) return false;
                widget.value = value;
                widget.callback?.(value);
                return true;
            }""",
            [node_id, name, value],
        )
        if not ok:
            raise KeyError(f"node {node_id} has no widget {name!r}")

    def set_mode(self, node_ids: list[int], mode: int) -> None:
        """0 always, 2 never (muted), 4 bypass."""
        self.evaluate(
            """([ids, mode]) => { for (const id of ids) NODE(id).mode = mode;
                                  GRAPH.setDirtyCanvas(true, true); }""",
            [node_ids, mode],
        )

    def api_prompt(self) -> dict:
        """The API-format prompt the front end would queue now (app.graphToPrompt)."""
        return self.evaluate("async () => (await window.app.graphToPrompt()).output")

    def queue(self, timeout: float = 30.0) -> str:
        """Queue the graph as the Queue button does; returns the new prompt id."""
        self.evaluate(
            """async () => {
                window.__vilauQueued = [];
                const api = window.comfyAPI.api.api;
                if (!window.__vilauQueueHook) {
                    window.__vilauQueueHook = true;
                    const queuePrompt = api.queuePrompt.bind(api);
                    api.queuePrompt = async (...args) => {
                        const res = await queuePrompt(...args);
                        window.__vilauQueued.push(res.prompt_id);
                        return res;
                    };
                }
                await window.app.queuePrompt(0, 1);
            }"""
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = self.evaluate("() => window.__vilauQueued")
            if queued:
                return queued[-1]
            self.page.wait_for_timeout(100)
        raise TimeoutError("the front end queued nothing\n" + self.console_tail())

    def widget_value(self, node_id: int, name: str) -> Any:
        """The value of a node's widget (None when the node or the widget is missing)."""
        return self.evaluate(
            """([id, name]) => {
                const widget = NODE(id)?.widgets?.find(w => w.name === name);
                return widget === undefined ? null : widget.value;
            }""",
            [node_id, name],
        )

    def text_boxes(self) -> list[str]:
        """What the text areas drawn over nodes show (DOM widgets: prompts, answer boxes), visible ones only."""
        return self.evaluate(
            """() => Array.from(document.querySelectorAll('textarea'))
                .filter(e => e.offsetParent !== null).map(e => e.value)"""
        )

    def fit_view(self, left: int = 70, top: int = 120, margin: int = 20, max_scale: float = 1.0,
                 only: list | None = None) -> None:
        """Zoom and pan so that every node and group (or only the nodes with the ids in `only`) is on
        screen, below the tabs and right of the side bar."""
        self.evaluate(
            """([left, top, margin, maxScale, only]) => {
                const c = window.app.canvas, g = GRAPH;
                const nodes = only ? g._nodes.filter(n => only.includes(n.id)) : g._nodes;
                const groups = only ? [] : (g._groups || []);
                const boxes = [...nodes.map(n => [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]),
                               ...groups.map(gr => gr._bounding ? Array.from(gr._bounding) : [...gr.pos, ...gr.size])];
                if (!boxes.length) return;
                const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
                const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
                const w = window.innerWidth - left - margin, h = window.innerHeight - top - margin;
                const scale = Math.min(maxScale, w / (x1 - x0), h / (y1 - y0));
                c.ds.scale = scale;
                c.ds.offset = [left / scale - x0, top / scale - y0];
                c.setDirty(true, true);
            }""",
            [left, top, margin, max_scale, only],
        )
        self.page.wait_for_timeout(400)

    def nodes_box(self, margin: int = 12, only: list | None = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) on screen, in CSS pixels, of all nodes (or those with the ids in
        `only`) with their title bars."""
        box = self.evaluate(
            """([margin, only]) => {
                const c = window.app.canvas, [ox, oy] = c.ds.offset, s = c.ds.scale;
                const nodes = only ? GRAPH._nodes.filter(n => only.includes(n.id)) : GRAPH._nodes;
                const boxes = nodes.map(n => [n.pos[0], n.pos[1] - 30, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
                const [x0, y0] = [Math.min(...boxes.map(b => b[0])), Math.min(...boxes.map(b => b[1]))];
                const [x1, y1] = [Math.max(...boxes.map(b => b[2])), Math.max(...boxes.map(b => b[3]))];
                const rect = c.canvas.getBoundingClientRect();
                return [(x0 + ox) * s + rect.left - margin, (y0 + oy) * s + rect.top - margin,
                        (x1 + ox) * s + rect.left + margin, (y1 + oy) * s + rect.top + margin];
            }""",
            [margin, only],
        )
        return tuple(round(v) for v in box)

    def node_layout(self) -> list[dict]:
        """Every node's box on the canvas in graph units, title bar included ([x, y, w, h]), its size, the
        size it needs to show all its widgets (computeSize), whether it has a media preview, and its combo widgets' values and choices."""
        return self.evaluate(
            """() => GRAPH._nodes.map(n => ({
                id: n.id, type: n.type, title: n.title,
                box: [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0],
                      n.size[1] + LiteGraph.NODE_TITLE_HEIGHT],
                size: Array.from(n.size), need: Array.from(n.computeSize()),
                // a media preview (Load Video's) scales with the node: it needs more than any size it has
                scales: (n.widgets || []).some(w => /preview/i.test(w.name) || /preview/i.test(w.type)),
                combos: Object.fromEntries((n.widgets || []).filter(w => w.type === 'combo')
                    .map(w => [w.name, [w.value, Array.isArray(w.options?.values) ? w.options.values : null]])),
            }))"""
        )

    def dismiss_toasts(self) -> None:
        self.evaluate("() => document.querySelectorAll('.p-toast-close-button').forEach(b => b.click())")
        self.page.wait_for_timeout(200)

    def toasts(self) -> list[str]:
        """Texts of the front end's toast messages on screen (alerts such as workflow validation errors)."""
        return self.evaluate("() => Array.from(document.querySelectorAll('.p-toast-message')).map(e => e.innerText)")

    def screenshot(self, name: str) -> Path:
        folder = self.screenshot_dir or Path(tempfile.mkdtemp(prefix="vilau-shots-"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def console_tail(self, n: int = 30) -> str:
        return "\n".join(self.console[-n:])
