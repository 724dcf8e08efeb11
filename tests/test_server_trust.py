"""Through a real ComfyUI server (tiny SD1.5 model): a graph of only the trainer runs and writes its file;
resuming continues exactly (Load T-LoRA -> Train, Train -> Train, a cancelled run's file); a cancel shows as
cancelled and the log names the saved file; the pack's errors reach the UI as one plain message."""

import pytest
import torch
from safetensors.torch import load_file

STEPS = 6


def _train_only(steps, prefix, resume=None, node="3"):
    """CheckpointLoaderSimple + LoadImage + Train T-LoRA and nothing else: the trainer is the output."""
    train = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "trigger": "sks",
             "class_word": "dog", "prompt_template": "a photo of {trigger} {class}", "variant": "tlora",
             "rank": 4, "min_rank": 2, "steps": steps, "learning_rate": 1e-3, "seed": 0,
             "filename_prefix": prefix, "resolution": 64}
    if resume is not None:
        train["resume"] = resume
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "tlora_sample.png"}},
            node: {"class_type": "TLoraTrainFromImage", "inputs": train}}


def _load(name):
    return {"class_type": "TLoraLoad", "inputs": {"model": ["1", 0], "tlora_name": name, "strength": 1.0,
                                                  "min_rank": 0, "exponent": 0.0}}


def _saved(server, entry, node="3"):
    name = entry["outputs"][node]["text"][0]
    return name, server.base_dir / "models" / "loras" / name


def _assert_same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:3]


@pytest.fixture(scope="module")
def full_run(comfy_server):
    """The uninterrupted reference run, from a graph of only the trainer."""
    entry = comfy_server.run(_train_only(STEPS, "trust/full"), timeout=600)
    name, path = _saved(comfy_server, entry)
    assert name == "trust/full_00001.safetensors" and path.is_file() and path.with_name(path.name + ".state").is_file()
    return path


def test_a_graph_of_only_the_trainer_runs_and_writes_the_file(full_run):
    assert full_run.stat().st_size > 0


def test_load_then_train_resumes_exactly(comfy_server, full_run):
    _, part = _saved(comfy_server, comfy_server.run(_train_only(2, "trust/part"), timeout=600))
    wf = _train_only(STEPS, "trust/resumed", resume=["4", 1])
    wf["4"] = _load(part.relative_to(comfy_server.base_dir / "models" / "loras").as_posix())
    _, resumed = _saved(comfy_server, comfy_server.run(wf, timeout=600))
    _assert_same_tensors(resumed, full_run)


def test_train_then_train_resumes_exactly(comfy_server, full_run):
    wf = _train_only(2, "trust/first", node="5")
    wf.update(_train_only(STEPS, "trust/second", resume=["5", 1]))
    _, second = _saved(comfy_server, comfy_server.run(wf, timeout=600))
    _assert_same_tensors(second, full_run)


def test_a_cancel_shows_as_cancelled_names_the_file_and_the_file_resumes_exactly(comfy_server, full_run):
    listener = comfy_server.listen()
    try:
        prompt_id = comfy_server.post_prompt(_train_only(STEPS, "trust/cancelled"))
        while True:  # cancel as soon as the first step is reported
            event = listener._receive()
            assert event is not None, "no progress"
            if event[0] == "text" and event[2].startswith("step "):
                comfy_server._request("POST", "/interrupt", {})
                break
        listener.until_done(prompt_id)
    finally:
        listener.close()
    status = comfy_server.finished(prompt_id, timeout=60)["status"]
    assert status["status_str"] == "error" and not status["completed"]
    assert [m[0] for m in status["messages"]][-1] == "execution_interrupted"
    notes = [line for line in comfy_server.log_text().splitlines() if "T-LoRA: cancelled at step" in line]
    assert notes, "the log says the run was cancelled"
    saved = sorted((comfy_server.base_dir / "models" / "loras" / "trust").glob("cancelled_*steps_00001.safetensors"))
    assert len(saved) == 1 and str(saved[0]) in notes[-1], notes
    wf = _train_only(STEPS, "trust/after_cancel", resume=["4", 1])
    wf["4"] = _load(f"trust/{saved[0].name}")
    _, resumed = _saved(comfy_server, comfy_server.run(wf, timeout=600))
    _assert_same_tensors(resumed, full_run)


def test_a_pack_error_reaches_the_ui_as_one_plain_message(comfy_server, full_run):
    wf = _train_only(1, "unused")
    del wf["3"]
    wf["4"] = _load("trust/full_00001.safetensors")
    wf["4"]["inputs"]["strength"] = float("nan")  # ComfyUI's own min/max checks let NaN through
    wf["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}
    entry = comfy_server.finished(comfy_server.post_prompt(wf))
    error = dict(entry["status"]["messages"])["execution_error"]
    assert error["exception_type"] == "TLoraError"
    assert error["exception_message"].startswith("strength must be a finite number, got nan; use 1")
    pack_frames = [frame for frame in error["traceback"] if "comfyui-tlora" in frame]
    assert len(pack_frames) == 1 and "nodes/common.py" in pack_frames[0], error["traceback"]  # the wrapper only
