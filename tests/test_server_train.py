"""Train T-LoRA from image through a real ComfyUI server's HTTP API, then Load T-LoRA on the saved file."""
import io

import numpy as np
from PIL import Image


def _sample(model_ref, seed=3):
    """Prompt, empty 64 px latent, 2 Euler steps, decode, save: nodes 10-16 of an API workflow."""
    return {
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks dog on a beach"}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "12": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": ["10", 0], "negative": ["11", 0], "latent_image": ["12", 0],
            "seed": seed, "steps": 2, "cfg": 4.0, "sampler_name": "heun", "scheduler": "normal", "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "tlora_test"}},
    }


def _train_workflow():
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "tlora_sample.png"}},
        "3": {"class_type": "TLoraTrainFromImage", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "trigger": "sks",
            "class_word": "dog", "prompt_template": "a photo of {trigger} {class}", "variant": "tlora",
            "rank": 4, "min_rank": 2, "steps": 3, "learning_rate": 1e-3, "seed": 0,
            "filename_prefix": "tlora/http_test", "resolution": 64}},
    }
    wf.update(_sample(["3", 0]))
    return wf


def _image_of(server, entry):
    item = entry["outputs"]["15"]["images"][0]
    return np.asarray(Image.open(server.output_path(item)))


def test_trained_model_and_loaded_file_sample_the_same_image(comfy_server):
    entry = comfy_server.run(_train_workflow(), timeout=600)
    file_name = entry["outputs"].get("3", {}).get("text") or None
    saved = sorted((comfy_server.base_dir / "models" / "loras" / "tlora").glob("http_test_*.safetensors"))
    assert [p.name for p in saved] == ["http_test_00001.safetensors"], file_name
    trained_image = _image_of(comfy_server, entry)
    assert trained_image.shape == (64, 64, 3)

    load = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
            "4": {"class_type": "TLoraLoad", "inputs": {"model": ["1", 0], "tlora_name": "tlora/http_test_00001.safetensors",
                                                       "strength": 1.0, "min_rank": 0, "exponent": 0.0}}}
    load.update(_sample(["4", 0]))
    loaded_image = _image_of(comfy_server, comfy_server.run(load, timeout=300))
    base = {"1": load["1"], **_sample(["1", 0])}
    base_image = _image_of(comfy_server, comfy_server.run(base, timeout=300))
    assert np.array_equal(loaded_image, trained_image)
    assert not np.array_equal(base_image, trained_image), "the T-LoRA must change the sample"


def progress_values(events, node: str) -> list[tuple[int, int]]:
    """(value, max) of each 'progress' websocket message about `node`, in arrival order."""
    return [(e[1]["data"]["value"], e[1]["data"]["max"]) for e in events
            if e[0] == "json" and e[1]["type"] == "progress" and e[1]["data"].get("node") == node]


def assert_progress_of(values: list[tuple[int, int]], steps: int):
    """What ComfyUI guarantees of a node's progress bar: newer ComfyUI drops an update that comes within
    0.1 s of the last one sent (comfy.utils.ProgressBar), but always sends the first and the last; so the
    values rise, none twice, from the first step to the last, each against the same max."""
    assert values and all(total == steps for _, total in values), values
    shown = [v for v, _ in values]
    assert shown[0] == 1 and shown[-1] == steps, values
    assert all(a < b for a, b in zip(shown, shown[1:])), values


def test_training_shows_step_and_loss_to_the_client_that_queued_it(comfy_server):
    """The node's progress bar (value / max) and 'step k/N  loss x' under the node reach the queueing
    client over the websocket; another browser tab connected to the same server gets no training text."""
    wf = _train_workflow()
    wf["3"]["inputs"].update(steps=4, seed=7, filename_prefix="tlora/progress_test")
    watcher, bystander = comfy_server.listen(), comfy_server.listen(client_id="another-tab")
    try:
        prompt_id = comfy_server.post_prompt(wf)
        events = watcher.until_done(prompt_id)
        # The other tab's own small prompt, queued after the training ended: the server sends its messages
        # in order, so anything the training sent that tab arrived before this prompt's end.
        barrier = {"1": {"class_type": "LoadImage", "inputs": {"image": "tlora_sample.png"}},
                   "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        other = bystander.until_done(comfy_server.post_prompt(barrier, client_id="another-tab"))
    finally:
        watcher.close()
        bystander.close()
    comfy_server.wait(prompt_id)
    assert_progress_of(progress_values(events, "3"), 4)
    texts = [e[2] for e in events if e[0] == "text" and e[1] == "3"]  # the node's own text: every step
    assert [t.split("  ")[0] for t in texts] == [f"step {k}/4" for k in range(1, 5)], texts
    assert all(float(t.split("loss ")[1]) >= 0 for t in texts)
    assert not [e for e in other if e[0] == "text"], "training text went to a client that did not queue it"
    assert not progress_values(other, "3"), "training progress went to a client that did not queue it"


def test_previews_reach_the_client_while_training_and_come_out_as_one_batch(comfy_server):
    """preview_every 2 of 4 steps: a preview image on the websocket right after steps 2 and 4 (with the
    node's progress at that step), and the node's 'previews' output holds floor(4 / 2) images."""
    wf = _train_workflow()
    wf["3"]["inputs"].update(steps=4, seed=7, filename_prefix="tlora/preview_test", preview_every=2, preview_steps=2)
    wf = {k: wf[k] for k in ("1", "2", "3")}
    wf["20"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 4], "filename_prefix": "tlora_previews"}}
    listener = comfy_server.listen()
    try:
        prompt_id = comfy_server.post_prompt(wf)
        events = listener.until_done(prompt_id)
    finally:
        listener.close()
    entry = comfy_server.wait(prompt_id)
    seen, step = [], 0
    for event in events:
        if event[0] == "json" and event[1]["type"] == "progress" and event[1]["data"].get("node") == "3":
            step = event[1]["data"]["value"]
        elif event[0] == "preview":
            seen.append((step, Image.open(io.BytesIO(event[1])).size))
    assert [s for s, _ in seen] == [2, 4], seen
    assert all(w > 0 and h > 0 for _, (w, h) in seen)
    saved = entry["outputs"]["20"]["images"]
    assert len(saved) == 2
    assert all(Image.open(comfy_server.output_path(item)).size == (64, 64) for item in saved)
