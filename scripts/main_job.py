"""Train a T-LoRA from one image and sample with it, headless, in a real ComfyUI (the main job).

Runs workflows/api/train_and_sample.api.json, the API twin of the "train_and_sample" template, on a
ComfyUI server started on 127.0.0.1 for this run only, and stops it at the end. Everything the run
reads and writes lives under --out (default out/main_job): custom_nodes/comfyui-tlora (a link to this
pack), models/checkpoints (a link to your checkpoint), input (a copy of your image: ComfyUI refuses
input files that lead outside input/), models/loras (the T-LoRA), output (the samples, the loss
curve and the previews taken while training), and comfyui.log. Your ComfyUI tree itself is never modified.

Without --checkpoint it uses a small random-weight SD1.5-shaped model (tests/support/tiny_model.py)
and small settings, so the whole path runs in a few minutes on a CPU; the pictures are noise-like by
design. With --checkpoint it uses the workflow's settings (the paper's: rank 64, r_min 32, 800 steps,
lr 1e-4, 1024 px latents) unless you override them below. Usually started by scripts/main_job.sh.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.comfy_server import HOST, PACK_DIR_NAME, ComfyServer, ComfyServerError, copy_input  # noqa: E402
from support.workflow_format import find_node  # noqa: E402

WORKFLOW = REPO_ROOT / "workflows" / "api" / "train_and_sample.api.json"
TINY_CHECKPOINT = "tiny_sd15.safetensors"
SAMPLE_IMAGE = "tlora_sample.png"
# Small enough for 2 CPU cores: the whole no-argument run takes under 2 minutes of CPU time.
TINY = {"steps": 30, "rank": 8, "min_rank": 4, "learning_rate": 1e-3, "resolution": 64, "preview_every": 10,
        "sample_steps": 10, "size": 128}
TEXT_EVENT = 3  # ComfyUI's binary websocket message: node id + progress text


# ---- command line ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/main_job.sh", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--checkpoint", type=Path, help="a checkpoint file (SD-XL or SD1.5 .safetensors); "
                                                   "default: the tiny built-in test model")
    g.add_argument("--image", type=Path, help="the subject's photo; default: a generated sample image")
    g.add_argument("--comfyui", type=Path, help="an existing ComfyUI source tree (default: .deps/ComfyUI, "
                                                "installed by scripts/setup_env.sh)")
    g.add_argument("--python", default=sys.executable,
                   help="the Python that runs ComfyUI (default: this one; main_job.sh picks the venv of the "
                        "test host whose tree --comfyui names)")
    g.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "main_job", help="run folder (default: %(default)s)")
    g.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: the GPU when that Python's torch sees one, else the CPU")
    t = p.add_argument_group("training (default: the workflow's values; smaller ones with the tiny model)")
    t.add_argument("--steps", type=int, help="0 = the model family's recipe")
    t.add_argument("--rank", type=int, help="0 = the model family's recipe")
    t.add_argument("--min-rank", type=int, help="r_min: lower = more diversity, higher = more fidelity; 0 = the "
                                                 "model family's recipe")
    t.add_argument("--learning-rate", type=float, help="0 = the optimizer's recipe (AdamW 1e-4, Prodigy 1.0)")
    t.add_argument("--optimizer", choices=("auto", "adamw", "prodigy"),
                   help="auto = the model family's recipe (SD: AdamW, as the paper; Flux and other DiTs: Prodigy)")
    t.add_argument("--resolution", type=int, help="training size in px; 0 = the model family's native size")
    t.add_argument("--variant", choices=("auto", "tlora", "vanilla_tlora", "ortho_lora", "lora"),
                   help="auto = the model family's recipe")
    t.add_argument("--trigger", help="the rare word that stands for the subject (workflow: sks)")
    t.add_argument("--class-word", help="what the subject is (workflow: dog)")
    t.add_argument("--seed", type=int, help="training seed")
    t.add_argument("--preview-every", type=int, help="a preview image every N steps, kept in the run folder; "
                                                     "0 = off (workflow: 100)")
    t.add_argument("--filename-prefix", help="T-LoRA file name under models/loras (workflow: tlora/sks_dog)")
    s = p.add_argument_group("sampling")
    s.add_argument("--prompt", help="positive prompt (workflow: 'a photo of sks dog on the beach, ...')")
    s.add_argument("--negative", help="negative prompt")
    s.add_argument("--sample-steps", type=int)
    s.add_argument("--cfg", type=float)
    s.add_argument("--sample-seed", type=int)
    s.add_argument("--size", type=int, help="latent width and height in px (workflow: 1024; SD1.5: use 512)")
    r = p.add_argument_group("run")
    r.add_argument("--port", type=int, help="server port on 127.0.0.1 (default: a free one)")
    r.add_argument("--timeout", type=float, default=6 * 3600, help="give up after this many seconds")
    r.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)  # main_job.sh, before set-up
    args = p.parse_args(argv)
    problems = argument_problems(args)
    if problems:
        p.error("\n  ".join(problems))
    return args


# ---- checking the arguments (before any set-up: a mistake costs seconds, not a training run) ----------

# option -> (node, input, min, max): the bounds the nodes declare. tests/test_main_job.py compares them
# with a running server's /object_info, so this table cannot drift from the nodes.
BOUNDS = {
    "steps": ("TLoraTrainFromImage", "steps", 0, 100000),
    "rank": ("TLoraTrainFromImage", "rank", 0, 512),
    "min_rank": ("TLoraTrainFromImage", "min_rank", 0, 512),
    "learning_rate": ("TLoraTrainFromImage", "learning_rate", 0.0, 10.0),
    "resolution": ("TLoraTrainFromImage", "resolution", 0, 2048),
    "seed": ("TLoraTrainFromImage", "seed", 0, 0xFFFFFFFF),
    "preview_every": ("TLoraTrainFromImage", "preview_every", 0, 100000),
    "sample_steps": ("KSampler", "steps", 1, 10000),
    "cfg": ("KSampler", "cfg", 0.0, 100.0),
    "sample_seed": ("KSampler", "seed", 0, 0xFFFFFFFFFFFFFFFF),
    "size": ("EmptyLatentImage", "width", 16, 16384),
}
CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def image_kind(path: Path):
    """The format of an image file from its first bytes (what ComfyUI's LoadImage opens), or None."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in IMAGE_MAGIC if head.startswith(magic)), None)


def file_problem(path, option, suffixes=None, images=False):
    """Why `path` cannot be used for `option`, or None."""
    if path is None:
        return None
    if path.is_dir():
        what = "one image file (PNG, JPEG, WEBP, ...)" if images else "a checkpoint file"
        return f"{option} {path} is a folder; give {what}."
    if not path.is_file():
        return f"{option} {path}: no such file."
    if suffixes and path.suffix.lower() not in suffixes:
        return f"{option} {path}: ComfyUI lists checkpoints ending in {', '.join(suffixes)} only; rename the file."
    try:
        if images and image_kind(path) is None:
            return f"{option} {path} is not an image ComfyUI can load (PNG, JPEG, WEBP, BMP, GIF or TIFF)."
    except OSError as exc:
        return f"{option} {path} cannot be read ({exc.strerror})."
    return None


def port_problem(port):
    if port is None:
        return None
    if not 1 <= port <= 65535:
        return f"--port {port}: choose a port from 1 to 65535."
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return (f"--port {port} is in use on {HOST} (another ComfyUI?). The main job only talks to a server it "
                    f"started itself: choose a free port, or leave --port out to pick one.")
    return None


def nvidia_driver_present() -> bool:
    """A quick look for an NVIDIA driver (torch is not asked here: importing it takes seconds)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def argument_problems(args) -> list[str]:
    """Every reason the run would fail that can be seen without installing or starting anything."""
    problems = [file_problem(args.checkpoint, "--checkpoint", CHECKPOINT_SUFFIXES),
                file_problem(args.image, "--image", images=True), port_problem(args.port)]
    for name, (node, field, low, high) in BOUNDS.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            problems.append(f"--{name.replace('_', '-')} {value}: {node}'s {field} must be from {low:g} to {high:g}.")
    rank = args.rank or (TINY["rank"] if args.checkpoint is None else None)
    if args.min_rank and rank and args.min_rank > rank:
        problems.append(f"--min-rank {args.min_rank} is above the rank {rank}; r_min must be between 1 and the rank.")
    if args.size is not None and args.size % 8:
        problems.append(f"--size {args.size}: use a multiple of 8 (latents are 1/8 of the image size).")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        problems.append(f"--timeout {args.timeout}: give a number of seconds > 0.")
    if args.comfyui is not None and not (args.comfyui / "main.py").is_file():
        problems.append(f"--comfyui {args.comfyui} is not a ComfyUI source tree (no main.py in it).")
    if args.device == "gpu" and not nvidia_driver_present():
        problems.append("--device gpu, but this machine has no NVIDIA driver (no /proc/driver/nvidia, no "
                        "nvidia-smi); use --device cpu or auto.")
    return [p for p in problems if p]


# ---- the run folder -------------------------------------------------------------------------------

def _link(src: Path, dst: Path):
    """dst -> src, replacing a link left by an earlier run that pointed elsewhere."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src.resolve():
            return
        dst.unlink()
    dst.symlink_to(src.resolve())


def prepare_run_folder(args, comfyui: Path) -> tuple[str, str]:
    """Lay out args.out; returns (checkpoint name, image name) as ComfyUI will list them."""
    base = args.out
    for sub in ("models/checkpoints", "models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    _link(REPO_ROOT, base / "custom_nodes" / PACK_DIR_NAME)
    if args.checkpoint is not None:
        _link(args.checkpoint, base / "models" / "checkpoints" / args.checkpoint.name)
        ckpt = args.checkpoint.name
    else:
        ckpt = TINY_CHECKPOINT
        path = base / "models" / "checkpoints" / ckpt
        if not path.is_file():
            say(f"building the tiny test model -> {path}")
            env = dict(os.environ, TLORA_COMFYUI_DIR=str(comfyui))
            subprocess.run([args.python, str(REPO_ROOT / "tests" / "support" / "tiny_model.py"), str(path)],
                           check=True, env=env, stdout=subprocess.DEVNULL)
    if args.image is not None:
        return ckpt, copy_input(args.image, base / "input")
    path = base / "input" / SAMPLE_IMAGE
    if not path.is_file():
        from support.tiny_model import make_sample_image

        make_sample_image(path, size=256)
    return ckpt, SAMPLE_IMAGE


def build_workflow(args, ckpt: str, image: str) -> dict:
    """The API workflow with the run's files and settings."""
    wf = json.loads(WORKFLOW.read_text("utf-8"))
    tiny = TINY if args.checkpoint is None else {}

    def pick(name, *, key=None):
        value = getattr(args, name)
        return value if value is not None else tiny.get(key or name)

    wf[find_node(wf, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = ckpt
    wf[find_node(wf, "LoadImage")]["inputs"]["image"] = image
    train = wf[find_node(wf, "TLoraTrainFromImage")]["inputs"]
    for name in ("steps", "rank", "min_rank", "learning_rate", "optimizer", "resolution", "variant", "trigger",
                 "class_word", "seed", "preview_every", "filename_prefix"):
        if pick(name) is not None:
            train[name] = pick(name)
    sampler = wf[find_node(wf, "KSampler")]["inputs"]
    for name, key in (("sample_steps", "steps"), ("cfg", "cfg"), ("sample_seed", "seed")):
        if pick(name) is not None:
            sampler[key] = pick(name)
    for title, name in (("Positive prompt", "prompt"), ("Negative prompt", "negative")):
        if getattr(args, name) is not None:
            wf[find_node(wf, "CLIPTextEncode", title=title)]["inputs"]["text"] = getattr(args, name)
    if pick("size") is not None:
        wf[find_node(wf, "EmptyLatentImage")]["inputs"].update(width=pick("size"), height=pick("size"))
    return wf


# ---- the server -----------------------------------------------------------------------------------

class JobServer(ComfyServer):
    """ComfyServer with a chosen Python and device (the test fixture's always runs on the CPU)."""

    def __init__(self, comfyui_dir, base_dir, python: str, on_cpu: bool, port=None):
        super().__init__(comfyui_dir, base_dir, port=port)
        self.python, self.on_cpu = python, on_cpu

    def popen_options(self) -> dict:
        # A session of its own: Ctrl-C in the terminal then reaches the main job only, which cancels the run
        # through the server and waits for the trainer to save before it stops ComfyUI.
        return {"start_new_session": True}

    def start(self, timeout: float = 120.0) -> "JobServer":
        super().start(timeout)
        argv = self.get("/system_stats").get("system", {}).get("argv", [])
        if str(self.base_dir) not in argv:  # another server took the port after the check: never use it
            self.stop()
            raise ComfyServerError(f"another server answers on port {self.port}; choose a free --port.")
        return self

    def command(self) -> list:
        device = ["--cpu", "--use-pytorch-cross-attention"] if self.on_cpu else []
        return [self.python, str(self.comfyui_dir / "main.py"), *device, "--listen", HOST,
                "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.base_dir),
                "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]


def torch_sees_cuda(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def runs_on_cpu(args) -> bool:
    return args.device == "cpu" or (args.device == "auto" and not torch_sees_cuda(args.python))


# ---- following the run ----------------------------------------------------------------------------

def say(text: str):
    print(text, flush=True)


class Progress:
    """Turns ComfyUI's websocket messages into terminal lines: one per node, one live progress line."""

    def __init__(self, api: dict):
        self.titles = {k: v.get("_meta", {}).get("title", v["class_type"]) for k, v in api.items()}
        self.tty = sys.stdout.isatty()
        self.live = False
        self.node = None
        self.node_start = self.start = time.monotonic()
        self.last_print = 0.0
        self.text_nodes = set()  # nodes that send their own progress text (the trainer): no plain bar

    def _line(self, text: str, final: bool = False):
        if self.tty:
            sys.stdout.write("\r\033[K" + text + ("\n" if final else ""))
            sys.stdout.flush()
            self.live = not final
        elif final or time.monotonic() - self.last_print >= 5.0:  # logs: a line every 5 s
            say(text)
            self.last_print = time.monotonic()

    def end_live(self):
        if self.live:
            sys.stdout.write("\n")
            self.live = False

    def on_json(self, kind: str, data: dict):
        if kind == "execution_cached" and data.get("nodes"):
            say("cached (unchanged since the last run): " + ", ".join(self.titles.get(n, n) for n in data["nodes"]))
        elif kind == "executing" and data.get("node") is not None:
            self.end_live()
            self.node, self.node_start = data["node"], time.monotonic()
            say(f"[{time.monotonic() - self.start:6.1f} s] {self.titles.get(self.node, self.node)}")
        elif kind == "progress" and data.get("node") is not None and data["node"] not in self.text_nodes:
            value, total = data["value"], data["max"]
            rate = (time.monotonic() - self.node_start) / max(value, 1)
            self._line(f"    step {value}/{total}  ({rate:.2f} s/step)", final=value >= total)
        elif kind == "executed" and data.get("output", {}).get("text"):
            self.end_live()
            say("    -> " + " ".join(map(str, data["output"]["text"])))

    def on_text(self, node: str, text: str):
        """The trainer's 'step N/M  loss L' text, with the speed and the time left."""
        self.text_nodes.add(node)
        value = text.split("/")[0].split()[-1] if "/" in text else ""
        total = text.split("/")[1].split()[0] if "/" in text else ""
        eta = ""
        if value.isdigit() and total.isdigit() and int(value) > 0:
            per_step = (time.monotonic() - self.node_start) / int(value)
            eta = f"  {per_step:.2f} s/step, {per_step * (int(total) - int(value)):.0f} s left"
        self._line(f"    {text}{eta}", final=value == total and value != "")


async def follow(server: ComfyServer, api: dict, timeout: float, run: dict) -> dict:
    """Queue `api` and print its progress until it ends; returns its history entry. run["prompt_id"] is
    set as soon as the prompt is queued (for Ctrl-C).

    Ctrl-C sets a flag that the loop reads between messages and raises KeyboardInterrupt from there: the
    default, cancelling the task, can be swallowed when it coincides with a receive timeout (the job
    then went on training after Ctrl-C on a loaded machine)."""
    loop = asyncio.get_running_loop()
    ctrl_c = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, ctrl_c.set)
    try:
        return await _follow(server, api, timeout, run, ctrl_c)
    finally:
        loop.remove_signal_handler(signal.SIGINT)  # back to Python's KeyboardInterrupt for cancel()


async def _follow(server: ComfyServer, api: dict, timeout: float, run: dict, ctrl_c: asyncio.Event) -> dict:
    import aiohttp

    progress = Progress(api)
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://{HOST}:{server.port}/ws?clientId={server.client_id}") as ws:
            prompt_id = await asyncio.get_running_loop().run_in_executor(None, server.post_prompt, api)
            run["prompt_id"] = prompt_id
            say(f"queued prompt {prompt_id}")
            while time.monotonic() < deadline:
                if ctrl_c.is_set():
                    raise KeyboardInterrupt
                try:
                    msg = await ws.receive(timeout=1.0)
                except asyncio.TimeoutError:
                    if server.process.poll() is not None:
                        raise ComfyServerError(f"ComfyUI exited with code {server.process.returncode}:\n"
                                               + server.log_tail()) from None
                    continue
                if msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) >= 8:
                    if struct.unpack(">I", msg.data[:4])[0] == TEXT_EVENT:
                        n = struct.unpack(">I", msg.data[4:8])[0]
                        progress.on_text(msg.data[8:8 + n].decode(), msg.data[8 + n:].decode("utf-8", "replace"))
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(msg.data)
                    kind, data = event.get("type"), event.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    progress.on_json(kind, data)
                    if kind in ("execution_success", "execution_error", "execution_interrupted"):
                        progress.end_live()
                        return server.wait(prompt_id, timeout=60)  # raises with the node's error
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return server.wait(prompt_id, timeout=max(1.0, deadline - time.monotonic()))
    interrupt(server)
    raise ComfyServerError(f"the run did not finish within {timeout:.0f} s")


def interrupt(server: ComfyServer):
    """Ask ComfyUI to stop the running prompt (the trainer saves what it has learned)."""
    try:
        server._request("POST", "/interrupt", {})
    except OSError as e:
        say(f"(could not reach ComfyUI to interrupt it: {e})")


def cancel(server: ComfyServer, prompt_id) -> int:
    """Ctrl-C: stop the prompt through the server and wait until the trainer has saved what it learned.

    A prompt still waiting in the queue is removed from it; a running one is interrupted, and its history
    entry appears once the trainer's except-handler has written the file. A second Ctrl-C stops waiting.
    """
    if prompt_id is None or server.process is None or server.process.poll() is not None:
        say("\ninterrupted before the run started")
        return 130
    say("\ncancelling: asking ComfyUI to stop the run; the trainer saves what it has learned "
        "(Ctrl-C again to quit without waiting)")
    try:
        queue = server.get("/queue")
        if any(item[1] == prompt_id for item in queue.get("queue_pending", [])):
            server._request("POST", "/queue", {"delete": [prompt_id]})
            say("removed the run from the queue before it started")
            return 130
        interrupt(server)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and server.process.poll() is None:
            entry = (server.get(f"/history/{prompt_id}") or {}).get(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("stopped waiting: what the trainer had not saved yet is lost")
        return 130
    except OSError as e:
        say(f"(could not reach ComfyUI: {e})")
        return 130
    notes = [line.split("T-LoRA: ", 1)[1] for line in server.log_text().splitlines() if "T-LoRA: cancelled" in line]
    say(notes[-1] if notes else f"the run ended; see {server.log_path}")
    return 130


# ---- the end --------------------------------------------------------------------------------------

def report(server: ComfyServer, api: dict, entry: dict, started: float):
    out = entry["outputs"]
    tlora = out[find_node(api, "PreviewAny", title="Saved T-LoRA file")]["text"][0]
    tlora_path = server.base_dir / "models" / "loras" / tlora
    samples = [server.output_path(i) for i in out[find_node(api, "SaveImage")]["images"]]

    def kept(title: str, name: str) -> list:
        """A PreviewImage's images (temp/, which ComfyUI empties when it starts), copied next to the samples."""
        items = out.get(find_node(api, "PreviewImage", title=title), {}).get("images", [])
        copies = []
        for n, item in enumerate(items, 1):
            suffix = f"_{name}.png" if len(items) == 1 else f"_{name}_{n:02d}.png"
            copies.append(server.base_dir / "output" / Path(tlora).with_name(Path(tlora).stem + suffix))
            copies[-1].parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(server.output_path(item), copies[-1])
        return copies

    curves = kept("Loss curve", "loss_curve")
    previews = kept("Previews while training", "preview")

    def show(path):
        return os.path.relpath(path, Path.cwd()) if str(path).startswith(str(Path.cwd())) else str(path)

    say(f"\ndone in {time.monotonic() - started:.0f} s")
    say(f"  T-LoRA file : {show(tlora_path)}")
    for s in samples:
        say(f"  sample      : {show(s)}")
    for c in curves:
        say(f"  loss curve  : {show(c)}")
    if previews:
        say(f"  previews    : {len(previews)} images, {show(previews[0])} ... (one every "
            f"{api[find_node(api, 'TLoraTrainFromImage')]['inputs']['preview_every']} steps)")
    say(f"  server log  : {show(server.log_path)}")
    say("To use the T-LoRA in your ComfyUI: copy the file into ComfyUI/models/loras/ and open the "
        "'load_and_sample' template of comfyui-tlora (the pack must be in custom_nodes/).")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_only:
        return 0
    started = time.monotonic()
    comfyui = (args.comfyui or Path(os.environ.get("TLORA_COMFYUI_DIR") or REPO_ROOT / ".deps" / "ComfyUI")).resolve()
    if not (comfyui / "main.py").is_file():
        say(f"error: no ComfyUI at {comfyui} (give --comfyui DIR, or run scripts/setup_env.sh)")
        return 2
    on_cpu = runs_on_cpu(args)
    if args.device == "gpu" and not torch_sees_cuda(args.python):
        say(f"error: --device gpu, but the torch of {args.python} sees no CUDA device; use --device cpu or auto")
        return 2
    args.out = args.out.resolve()
    ckpt, image = prepare_run_folder(args, comfyui)
    api = build_workflow(args, ckpt, image)
    train = api[find_node(api, "TLoraTrainFromImage")]["inputs"]
    say(f"checkpoint {ckpt}{' (tiny test model)' if args.checkpoint is None else ''}, image {image}")
    say(f"training: {train['variant']}, rank {train['rank']}, r_min {train['min_rank']}, {train['steps']} steps, "
        f"lr {train['learning_rate']:g}, on the {'CPU' if on_cpu else 'GPU'}; run folder {args.out}")
    server = JobServer(comfyui, args.out, args.python, on_cpu, port=args.port)
    say(f"starting ComfyUI ({comfyui}) on {server.url} ...")
    run = {}
    try:
        server.start(timeout=300)
        say(f"ComfyUI is up after {time.monotonic() - started:.0f} s")
        entry = asyncio.run(follow(server, api, args.timeout, run))
        report(server, api, entry, started)
        return 0
    except KeyboardInterrupt:
        return cancel(server, run.get("prompt_id"))
    except ComfyServerError as e:
        say(f"\nerror: {e}\n(server log: {server.log_path})")
        if "ModuleNotFoundError" in str(e):
            say(f"{args.python} lacks a module this ComfyUI needs: give --python the Python your ComfyUI "
                "runs with (its venv), or install the tree's requirements.txt into it")
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
