"""The real ComfyUI front end (the comfyui-frontend-package the server serves) in headless Chromium.

Driven with Selenium and the system's chromedriver (Debian: `apt-get install chromium chromium-driver`),
so nothing is downloaded at test time. `FrontEnd.open(url)` waits until the app is up;
`load_workflow(data, name)` loads a UI-format workflow through the front end's own JS API
(`app.loadGraphData`, as the templates menu and drag-and-drop do) and returns what the front end made
of it: its nodes and widgets, its re-serialised graph, the API prompt it would queue (`graphToPrompt`),
visible dialogs and toasts, and the errors and warnings logged while loading.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_CANDIDATES = ("chromedriver", "chromium-driver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=2400,1400")


def _executable(given: str | None, names) -> str | None:
    if given:
        return shutil.which(given)  # a path or a name; None when it is not an executable file
    return next(filter(None, map(shutil.which, names)), None)


def find_chromium() -> tuple[str | None, str | None, str]:
    """(browser binary, chromedriver binary, why not) from $TLORA_CHROMIUM / $TLORA_CHROMEDRIVER or PATH."""
    browser = _executable(os.environ.get("TLORA_CHROMIUM"), CHROMIUM_CANDIDATES)
    driver = _executable(os.environ.get("TLORA_CHROMEDRIVER"), DRIVER_CANDIDATES)
    if browser is None:
        return None, driver, (f"no Chromium found (looked for {', '.join(CHROMIUM_CANDIDATES)} on PATH and "
                              "$TLORA_CHROMIUM); install it with `apt-get install -y chromium chromium-driver`")
    if driver is None:
        return browser, None, ("Chromium found but no chromedriver (looked for chromedriver on PATH and "
                               "$TLORA_CHROMEDRIVER); install it with `apt-get install -y chromium-driver`")
    return browser, driver, ""


FIRST_RUN_DONE = {"Comfy.TutorialCompleted": True}

# Installed before any page script runs: keeps every console error/warning and uncaught error.
CAPTURE_JS = r"""
window.__tlora_log = [];
for (const level of ['error', 'warn']) {
  const original = console[level].bind(console);
  console[level] = (...args) => {
    try { window.__tlora_log.push({level, text: args.map(a => (a && a.stack) ? a.stack : String(a)).join(' ')}); }
    catch (e) {}
    original(...args);
  };
}
window.addEventListener('error', e => window.__tlora_log.push({level: 'uncaught', text: String(e.message)}));
// The dialogs a user sees, found by their ARIA role: the front end's own classes changed between
// versions (PrimeVue '.p-dialog' in 1.32, utility-class markup in 1.49), the role did not.
window.__tlora_dialogs = () => [...document.querySelectorAll('[role=dialog], [role=alertdialog]')].filter(
  el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length));
window.addEventListener('unhandledrejection',
  e => window.__tlora_log.push({level: 'unhandledrejection', text: String(e.reason && (e.reason.stack || e.reason))}));
// Requests the page has in flight (the front end talks to the server through fetch).
window.__tlora_pending = 0;
const plainFetch = window.fetch.bind(window);
window.fetch = (...args) => {
  window.__tlora_pending++;
  return plainFetch(...args).finally(() => { window.__tlora_pending--; });
};
// Resolves once the page has settled: no request in flight and every image of an open dialog loaded (or
// failed), on two checks in a row. A request's follow-ups start in its own continuation, before the next
// check runs, so this waits for conditions, not for a span of time that load could stretch.
window.__tlora_settled = async () => {
  for (let quiet = 0; quiet < 2; ) {
    await new Promise(r => setTimeout(r, 100));
    const images = window.__tlora_dialogs().flatMap(d => [...d.querySelectorAll('img')]);
    quiet = (window.__tlora_pending > 0 || images.some(i => !i.complete)) ? 0 : quiet + 1;
  }
};
"""

SETTLED_JS = "return window.__tlora_settled();"

READY_JS = """
return !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
          && Object.keys(window.LiteGraph.registered_node_types || {}).length > 0
          && document.querySelector('canvas'));
"""

LOAD_JS = r"""
return (async (workflow, name) => {
const mark = window.__tlora_log.length;
const toastsBefore = new Set([...document.querySelectorAll('.p-toast-message')]);
await window.app.loadGraphData(structuredClone(workflow), true, true, name);
await window.__tlora_settled();  // what loading asks the server (e.g. the model lists) and shows after it
window.app.canvas.setDirty(true, true);
const registered = window.LiteGraph.registered_node_types;
const nodes = window.app.graph.nodes.map(n => ({
  id: n.id, type: n.type, title: n.title, registered: !!registered[n.type], has_errors: !!n.has_errors,
  size: [n.size[0], n.size[1]], min_size: Array.from(n.computeSize()),
  widgets: (n.widgets || []).map(w => ({
    name: w.name, type: w.type, value: (w.value === undefined ? null : w.value),
    min: (w.options && w.options.min !== undefined) ? w.options.min : null,
    max: (w.options && w.options.max !== undefined) ? w.options.max : null,
    values: (w.options && Array.isArray(w.options.values)) ? w.options.values : null})),
}));
const serialized = JSON.parse(JSON.stringify(window.app.graph.serialize()));
const prompt = await window.app.graphToPrompt();
return {
  nodes, serialized, prompt: JSON.parse(JSON.stringify(prompt.output)),
  dialogs: window.__tlora_dialogs().map(d => d.innerText),
  toasts: [...document.querySelectorAll('.p-toast-message')].filter(t => !toastsBefore.has(t)).map(t => t.innerText),
  log: window.__tlora_log.slice(mark),
  frontend_version: window.__COMFYUI_FRONTEND_VERSION__ || null,
};
})(arguments[0], arguments[1]);
"""


TEMPLATES_JS = r"""
const [pack, select] = arguments;
// The open dialog that lists the pack by name (in a side bar of categories, under EXTENSIONS in 1.49).
const leaf = d => [...d.querySelectorAll('*')].find(el => el.children.length === 0 && el.textContent.trim() === pack);
const dialog = window.__tlora_dialogs().find(leaf);
if (!dialog) return {category: false};
const category = leaf(dialog);
if (select) category.click();
return {
  category: !!category,
  text: dialog.innerText,
  images: [...dialog.querySelectorAll('img')].map(
    i => ({alt: i.alt, src: i.src, complete: i.complete, loaded: i.complete && i.naturalWidth > 0})),
};
"""

GRAPH_BOX_JS = r"""
const ds = window.app.canvas.ds, rect = window.app.canvas.canvas.getBoundingClientRect();
const title = window.LiteGraph.NODE_TITLE_HEIGHT, margin = 16;
let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
for (const n of window.app.graph.nodes) {
  x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
  x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
}
for (const g of window.app.graph.groups || []) {
  const [gx, gy, gw, gh] = g._bounding || g.bounding;
  x0 = Math.min(x0, gx); y0 = Math.min(y0, gy); x1 = Math.max(x1, gx + gw); y1 = Math.max(y1, gy + gh);
}
const sx = v => rect.left + (v + ds.offset[0]) * ds.scale, sy = v => rect.top + (v + ds.offset[1]) * ds.scale;
return {box: [sx(x0) - margin, sy(y0) - margin, sx(x1) + margin, sy(y1) + margin], window: window.innerWidth};
"""

COMMAND_JS = "return window.app.extensionManager.command.execute(arguments[0]);"

FIT_VIEW_JS = r"""
return (async () => {
  const settings = window.app.extensionManager && window.app.extensionManager.setting;
  if (settings) await settings.set('Comfy.Minimap.Visible', false);
  const commands = window.app.extensionManager && window.app.extensionManager.command;
  if (commands) await commands.execute('Comfy.Canvas.FitView');
  window.app.canvas.setDirty(true, true);
})();
"""


class FrontEnd:
    """One headless Chromium with a fresh profile, on one ComfyUI page."""

    def __init__(self, browser: str, driver: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="tlora-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=driver), options=options)
        self.driver.set_script_timeout(120)
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CAPTURE_JS})

    def open(self, url: str, timeout: float = 120.0, settings: dict | None = None) -> "FrontEnd":
        """Load the page once the user `settings` are stored on the server (by default: the first-run
        tour is done, so the templates browser does not open by itself)."""
        for key, value in (settings if settings is not None else FIRST_RUN_DONE).items():
            req = urllib.request.Request(f"{url}/api/settings/{key}", data=json.dumps(value).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=30).close()
        self.driver.get(url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.driver.execute_script(READY_JS):
                self.driver.execute_script(SETTLED_JS)  # the start-up workflow and the first dialogs
                self.close_dialogs()
                return self
            time.sleep(0.5)
        raise TimeoutError(f"the ComfyUI front end at {url} was not ready within {timeout:.0f} s; "
                           f"browser log:\n{self.browser_log()}")

    def close_dialogs(self):
        """Close start-up dialogs (templates browser, release notes) so they do not cover the graph."""
        self.driver.execute_script(  # the button a screen reader announces as "Close" / "Close dialog"
            "for (const d of window.__tlora_dialogs()) for (const b of d.querySelectorAll('button[aria-label]'))"
            "  if (/^close\\b/i.test(b.getAttribute('aria-label'))) b.click();")
        self.driver.execute_script(SETTLED_JS)

    def fetch_json(self, route: str):
        """GET a route of the server from inside the page (same origin as the front end)."""
        return self.driver.execute_script(
            "return fetch(arguments[0]).then(async r => ({status: r.status, body: await r.text()}));", route)

    def open_templates(self, pack: str, timeout: float = 120.0) -> dict:
        """Open the templates browser (the 'Browse Templates' command) on `pack`'s category.

        Returns the dialog's text and, per card image, its alt text (the template's name), its source
        (a blob: URL once the front end has cached it) and whether it loaded."""
        self.driver.execute_script("window.app.extensionManager.command.execute('Comfy.BrowseTemplates');")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.driver.execute_script(TEMPLATES_JS, pack, False)
            if found["category"]:
                self.driver.execute_script(TEMPLATES_JS, pack, True)
                # The cards (newer front ends render them after the click, with no request) and their thumbnails
                while time.monotonic() < deadline:
                    self.driver.execute_script(SETTLED_JS)
                    shown = self.driver.execute_script(TEMPLATES_JS, pack, False)
                    if shown["images"] and all(i["complete"] for i in shown["images"]):
                        break
                    time.sleep(0.5)
                return shown  # what is missing by the deadline, the caller's assertions name
            time.sleep(0.5)
        raise TimeoutError(f"the templates browser did not show a {pack!r} category within {timeout:.0f} s")

    def click_template(self, title: str, expect_type: str, timeout: float = 60.0) -> list[str]:
        """Click a template card by its title, as a user would, and wait until a node of `expect_type`
        is on the canvas; returns the node types then on the canvas."""
        from selenium.common.exceptions import NoSuchElementException
        from selenium.webdriver.common.by import By

        try:  # the card's thumbnail, found from its title; a real mouse click on it
            thumbnail = self.driver.find_element(
                By.XPATH, f"//*[@role='dialog']//*[normalize-space(text())='{title}']"
                          f"/ancestor::*[.//img][1]//img")
        except NoSuchElementException:
            raise LookupError(f"no template card titled {title!r} in the open dialog") from None
        thumbnail.click()
        deadline = time.monotonic() + timeout
        types = []
        while time.monotonic() < deadline:
            types = self.driver.execute_script("return window.app.graph.nodes.map(n => n.type);")
            if expect_type in types:
                self.driver.execute_script(SETTLED_JS)
                return self.driver.execute_script("return window.app.graph.nodes.map(n => n.type);")
            time.sleep(0.3)
        raise TimeoutError(f"after clicking the template {title!r} no {expect_type} node appeared within "
                           f"{timeout:.0f} s (canvas: {types})")

    def load_workflow(self, workflow: dict, name: str) -> dict:
        """Load a UI-format workflow (after closing any open dialog) and report what the front end made
        of it; see LOAD_JS."""
        self.close_dialogs()
        return self.driver.execute_script(LOAD_JS, workflow, name)

    def log_mark(self) -> int:
        return self.driver.execute_script("return window.__tlora_log.length;")

    def log_since(self, mark: int) -> list[dict]:
        """Console errors / warnings and uncaught errors logged since `log_mark()` returned `mark`."""
        return self.driver.execute_script("return window.__tlora_log.slice(arguments[0]);", mark)

    def screenshot(self, path: Path, whole_graph: bool = True) -> Path:
        """A PNG of the window; with `whole_graph`, zoomed to fit every node first (the front end's
        "Fit view" command), without the minimap."""
        if whole_graph:
            self.driver.execute_script(FIT_VIEW_JS)
            time.sleep(0.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path

    def thumbnail(self, path: Path, width: int = 640, height: int = 480) -> Path:
        """A JPEG of the whole graph alone (focus mode hides the menus), for the templates browser."""
        from io import BytesIO

        from PIL import Image

        self.driver.execute_script(COMMAND_JS, "Workspace.ToggleFocusMode")
        try:
            time.sleep(0.5)  # the canvas takes the whole window
            self.driver.execute_script(FIT_VIEW_JS)
            time.sleep(0.8)
            box = self.driver.execute_script(GRAPH_BOX_JS)
            shot = Image.open(BytesIO(self.driver.get_screenshot_as_png())).convert("RGB")
        finally:
            self.driver.execute_script(COMMAND_JS, "Workspace.ToggleFocusMode")
        ratio = shot.width / box["window"]  # device pixels per CSS pixel
        left, top, right, bottom = (round(v * ratio) for v in box["box"])
        shot = shot.crop((max(0, left), max(0, top), min(shot.width, right), min(shot.height, bottom)))
        shot.thumbnail((width, height), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (width, height), shot.getpixel((2, shot.height // 2)))
        canvas.paste(shot, ((width - shot.width) // 2, (height - shot.height) // 2))
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path, "JPEG", quality=82, optimize=True)
        return path

    def browser_log(self) -> str:
        try:
            return "\n".join(str(e) for e in self.driver.get_log("browser"))
        except Exception as e:  # noqa: BLE001  (diagnostics only; the log itself may be unavailable)
            return f"(browser log unavailable: {e})"

    def quit(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
