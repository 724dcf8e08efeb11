"""The main job checks every argument before any set-up: a mistake is answered at once (the standard library
only: no torch, no ComfyUI), with the fix, and nothing is installed, laid out or started."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAIN_JOB = REPO / "scripts" / "main_job.py"
HEAVY = ("torch", "numpy", "PIL", "comfy", "websocket")
# Runs main_job.py as a script, then says which heavy modules it had imported when it exited.
PROBE = f"""
import runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print("imported:", sorted(m for m in {HEAVY!r} if m in sys.modules))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _cases(tmp: Path, port: int):
    (tmp / "notes.png").write_text("not an image at all")
    (tmp / "photos").mkdir(exist_ok=True)
    (tmp / "model.txt").write_bytes(b"weights")
    cases = [
        (["--size", "7"], "--size 7: EmptyLatentImage's width must be from 16 to 16384"),
        (["--size", "100"], "--size 100: use a multiple of 8"),
        (["--sample-steps", "0"], "--sample-steps 0: KSampler's steps must be from 1 to 10000"),
        (["--steps", "-1"], "--steps -1: TLoraTrainFromImage's steps must be from 0 to 100000"),
        (["--learning-rate", "nan"], "--learning-rate nan: TLoraTrainFromImage's learning_rate must be from"),
        (["--min-rank", "9"], "--min-rank 9 is above the rank 8"),
        (["--image", str(tmp / "photos")], "photos is a folder; give one image file"),
        (["--image", str(tmp / "notes.png")], "notes.png is not an image ComfyUI can load"),
        (["--image", str(tmp / "missing.png")], "missing.png: no such file"),
        (["--checkpoint", str(tmp / "model.txt")], "ComfyUI lists checkpoints ending in .safetensors"),
        (["--port", str(port)], f"--port {port} is in use on 127.0.0.1"),
        (["--comfyui", str(tmp)], "is not a ComfyUI source tree"),
    ]
    if not Path("/proc/driver/nvidia/version").exists():
        cases.append((["--device", "gpu"], "--device gpu, but this machine has no NVIDIA driver"))
    return cases


def test_every_bad_argument_is_refused_before_anything_heavy_and_nothing_is_set_up(tmp_path, busy_port):
    run_folder = tmp_path / "run"
    for args, message in _cases(tmp_path, busy_port):
        proc = subprocess.run([sys.executable, "-c", PROBE, str(MAIN_JOB), "--out", str(run_folder), *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert "imported: []" in proc.stdout, f"{args}: {proc.stdout}"
        assert not run_folder.exists(), "nothing is laid out (and so no server started) for a refused run"


def test_all_problems_are_listed_at_once(tmp_path):
    proc = subprocess.run([sys.executable, str(MAIN_JOB), "--size", "7", "--sample-steps", "0", "--rank", "4",
                           "--min-rank", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--size 7" in proc.stderr and "--sample-steps 0" in proc.stderr and "--min-rank 5" in proc.stderr


def test_main_job_sh_checks_the_arguments_before_the_set_up(tmp_path):
    """The shell entry point refuses before scripts/setup_env.sh would install anything."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "main_job.sh"), "--sample-steps", "0",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--sample-steps 0" in proc.stderr
    assert "setup_env" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_bounds_match_the_nodes(comfy_server):
    """The main job's table of bounds is the nodes' own (from the running server's /object_info)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import main_job
    finally:
        sys.path.remove(str(REPO / "scripts"))
    info = comfy_server.object_info()
    for option, (node, field, low, high) in main_job.BOUNDS.items():
        spec = info[node]["input"]["required"].get(field) or info[node]["input"]["optional"][field]
        assert (spec[1]["min"], spec[1]["max"]) == (low, high), option
