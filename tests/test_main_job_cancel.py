"""Ctrl-C in the main job's terminal cancels the run through the server, waits until the trainer has saved,
names the file, and stops ComfyUI (which runs in a session of its own, so the terminal's SIGINT reaches only
the main job)."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode("utf-8", "replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_ctrl_c_cancels_through_the_server_waits_for_the_save_and_stops_comfyui(comfy, tmp_path):
    out = tmp_path / "run"
    # A process group of its own, like a shell job: SIGINT to the group is what the terminal sends on Ctrl-C.
    job = subprocess.Popen([sys.executable, str(REPO / "scripts" / "main_job.py"), "--comfyui", str(comfy.dir),
                            "--out", str(out), "--steps", "500", "--device", "cpu"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in job.stdout:  # until the trainer reports a step (the job prints one every 5 s at most)
            lines.append(line)
            if re.search(r"\bstep \d+/500\b", line):
                break
        else:
            raise AssertionError("the job ended before it reported a training step:\n" + "".join(lines))
        os.killpg(job.pid, signal.SIGINT)
        rest, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            # ComfyUI runs in a session of its own: a killed job leaves it training, so it goes too
            for pid in _processes_mentioning(str(out)):
                os.kill(pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert job.returncode == 130, text
    assert "cancelling: asking ComfyUI to stop the run" in text and "cancelled at step" in text, text
    saved = list((out / "models" / "loras").rglob("*steps_00001.safetensors"))
    assert len(saved) == 1 and saved[0].name in text, text
    assert saved[0].with_name(saved[0].name + ".state").is_file()
    assert not _processes_mentioning(str(out)), "ComfyUI was stopped"
