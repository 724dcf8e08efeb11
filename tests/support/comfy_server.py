"""A real ComfyUI server in a subprocess, on the loopback interface, with a small HTTP client.

Everything the server reads or writes (custom_nodes, models, input, output, temp, user, its sqlite
database, its log) lives under one base directory, so the ComfyUI tree itself is never modified.
"""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: the server must never listen on a public interface
PACK_DIR_NAME = "comfyui-tlora"


class ComfyServerError(RuntimeError):
    """The server refused a prompt, failed while running one, died, or did not answer in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def prepare_base_dir(base: Path, pack_dir: Path, checkpoints=(), input_files=()) -> Path:
    """Lay out a ComfyUI base directory: the pack and the models linked in, the inputs copied in."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
    for src in checkpoints:
        dst = base / "models" / "checkpoints" / Path(src).name
        if not dst.exists():
            dst.symlink_to(Path(src).resolve())
    for src in input_files:
        copy_input(Path(src), base / "input")
    return base


def copy_input(src: Path, input_dir: Path, name: str | None = None) -> str:
    """Copy `src` into ComfyUI's input folder as `name` (default: its own); returns the name LoadImage
    knows it by.

    Copied, never linked: ComfyUI (0.33 on) refuses input files that resolve outside input/. A file of
    that name already there is kept: the same bytes are reused, different ones get the next free name
    "<stem> (1)<suffix>", ... as ComfyUI's own upload does. A link there (left by an older run) is replaced.
    """
    src, wanted = Path(src), Path(name or Path(src).name)
    data = src.read_bytes()
    for i in range(10_000):
        name = wanted.name if i == 0 else f"{wanted.stem} ({i}){wanted.suffix}"
        dst = input_dir / name
        if dst.is_symlink():
            dst.unlink()
        if not dst.exists():
            input_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            return name
        if dst.is_file() and dst.read_bytes() == data:
            return name
    raise FileExistsError(f"{input_dir} holds 10000 different files named like {wanted.name}; clear some out")


class ComfyServer:
    """One ComfyUI process: `start()`, then `post_prompt` / `wait` / `run`, then `stop()`."""

    def __init__(self, comfyui_dir: Path, base_dir: Path, port: int | None = None, extra_args=()):
        self.comfyui_dir = Path(comfyui_dir)
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.extra_args = list(extra_args)
        self.client_id = uuid.uuid4().hex
        self.process = None
        self._log = None
        self.startup_log = ""  # the log as it stood when the server first answered (its import phase)

    # ---- lifetime --------------------------------------------------------------------------------

    def command(self) -> list:
        return [sys.executable, str(self.comfyui_dir / "main.py"),
                "--cpu", "--listen", HOST, "--port", str(self.port),
                "--disable-auto-launch", "--use-pytorch-cross-attention",
                "--base-directory", str(self.base_dir),
                # The default database lives inside the ComfyUI tree; keep it in the base dir too.
                "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
                *self.extra_args]

    def popen_options(self) -> dict:
        """Extra subprocess.Popen arguments for the server process (none here; see scripts/main_job.py)."""
        return {}

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # the server must import the pack the way a user's ComfyUI does
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), cwd=str(self.base_dir), env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        **self.popen_options())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with code {self.process.returncode} while starting:\n"
                                       + self.log_tail())
            try:
                self._request("GET", "/system_stats", timeout=2)
                self.startup_log = self.log_text()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyServerError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s:\n" + self.log_tail())

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        if self._log is not None:
            self._log.close()
            self._log = None

    # ---- HTTP ------------------------------------------------------------------------------------

    def _request(self, method, route, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, route, timeout=30):
        return self._request("GET", route, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def post_prompt(self, api_workflow: dict, client_id: str | None = None) -> str:
        """Queue an API-format workflow as `client_id` (default: this object's client); returns its
        prompt_id. A rejected prompt raises with node_errors."""
        try:
            answer = self._request("POST", "/prompt", {"prompt": api_workflow,
                                                       "client_id": client_id or self.client_id})
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.dumps(json.loads(detail), indent=1)
            except ValueError:
                pass
            raise ComfyServerError(f"POST /prompt answered HTTP {e.code}:\n{detail}") from None
        return answer["prompt_id"]

    def finished(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """The prompt's history entry once it finished, however it ended. ComfyUI writes the entry after
        its last websocket message (execution_interrupted included), so it is polled for."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI died (code {self.process.returncode}) while running "
                                       f"{prompt_id}:\n" + self.log_tail())
            time.sleep(0.25)
        self._request("POST", "/interrupt", {})  # do not leave it running into the next test
        raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n" + self.log_tail())

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """The prompt's history entry once it finished; raises with the node's exception on failure."""
        entry = self.finished(prompt_id, timeout)
        status = entry["status"]
        if status.get("status_str") != "success":
            raise ComfyServerError(f"prompt {prompt_id} failed:\n{self._describe_failure(status)}")
        return entry

    def run(self, api_workflow: dict, timeout: float = 300.0) -> dict:
        """post_prompt + wait."""
        return self.wait(self.post_prompt(api_workflow), timeout)

    def listen(self, client_id: str | None = None, timeout: float = 300.0) -> "Listener":
        """A websocket to /ws as `client_id` (default: the client that queues this object's prompts)."""
        return Listener(f"ws://{HOST}:{self.port}/ws?clientId={client_id or self.client_id}", timeout)

    def output_path(self, item: dict) -> Path:
        """Where a history output item ({"filename", "subfolder", "type"}) is on disk."""
        return self.base_dir / item.get("type", "output") / item.get("subfolder", "") / item["filename"]

    @staticmethod
    def _describe_failure(status: dict) -> str:
        lines = []
        for event, data in status.get("messages", []):
            if event in ("execution_error", "execution_interrupted"):
                lines.append(f"{event} in node {data.get('node_id')} ({data.get('node_type')}): "
                             f"{data.get('exception_type', '')}: {data.get('exception_message', '')}")
                lines.extend(data.get("traceback") or [])
        return "\n".join(lines) or json.dumps(status, indent=1)

    # ---- log -------------------------------------------------------------------------------------

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text("utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]


class Listener:
    """What the server pushes to one websocket client: JSON events and the binary progress texts.

    events: ("json", {"type", "data"}), ("text", node_id, text) and ("preview", image bytes) in arrival order.
    """

    TEXT_EVENT = 3  # server.BinaryEventTypes.TEXT: >I event, >I node id length, node id, utf-8 text
    PREVIEW_EVENT = 1  # server.BinaryEventTypes.PREVIEW_IMAGE: >I event, >I format, the encoded image

    def __init__(self, url: str, timeout: float):
        import websocket  # websocket-client
        self.ws = websocket.create_connection(url, timeout=timeout)
        self.events: list = []

    def _receive(self):
        import websocket
        try:
            msg = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        if isinstance(msg, bytes):
            kind = struct.unpack(">I", msg[:4])[0]
            if kind == self.TEXT_EVENT:
                size = struct.unpack(">I", msg[4:8])[0]
                self.events.append(("text", msg[8:8 + size].decode(), msg[8 + size:].decode("utf-8", "replace")))
            elif kind == self.PREVIEW_EVENT:
                self.events.append(("preview", msg[8:]))
        else:
            self.events.append(("json", json.loads(msg)))
        return self.events[-1] if self.events else None

    def until_done(self, prompt_id: str) -> list:
        """Receive until the prompt's execution ends (success, error or interruption); returns events."""
        while True:
            event = self._receive()
            if event is None:
                raise ComfyServerError(f"no websocket message for prompt {prompt_id} within the timeout")
            if event[0] == "json" and event[1].get("type") in ("execution_success", "execution_error",
                                                                 "execution_interrupted") \
                    and event[1].get("data", {}).get("prompt_id") == prompt_id:
                return self.events

    def close(self):
        self.ws.close()
