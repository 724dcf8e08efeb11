"""The example workflows (workflows/*.json, UI format, and their API twins workflows/api/*.api.json).

Static checks: the twins describe the same graph, the files are what tests/support/make_workflows.py
writes from the live node schemas, every widget value is one the server accepts, the committed settings
are the paper's, and the templates menu lists the UI files (and only those).
Runs: every API workflow executes on a real ComfyUI server with the tiny SD1.5 model, its settings
shrunk in a copy (3 training steps, rank 4, 64 px), and leaves the files and images it promises.
"""
import copy
import json
import math
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from support.comfy_server import PACK_DIR_NAME
from support.workflow_format import (VIRTUAL_NODES, display_title, find_node, find_nodes, input_specs, ui_to_api,
                                     widget_values_by_name)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
SD_WORKFLOWS = ("train_and_sample", "load_and_sample", "lora_vs_tlora", "convert_to_lora", "pick_best_checkpoint")
# One per family group, with the model's own loaders. Their API twins run in test_family_workflows.py, on
# tiny models where the loaders read tiny files (and with a tiny CLIP-L for their text encoders, which
# ComfyUI builds at full size whatever the file holds); that file says which cannot run and why.
FAMILY_WORKFLOWS = ("train_on_flux", "train_on_qwen_image", "train_on_z_image", "train_on_sd35", "train_on_wan22")
EXPECTED = SD_WORKFLOWS + FAMILY_WORKFLOWS
NAMES = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
# Combos whose choices are the user's files: the committed names need not exist on the test server.
FILE_WIDGETS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"), ("TLoraLoad", "tlora_name"),
                ("CLIPVisionLoader", "clip_name"), ("UNETLoader", "unet_name"), ("VAELoader", "vae_name"),
                ("CLIPLoader", "clip_name"), ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"),
                *(("TripleCLIPLoader", f"clip_name{i}") for i in (1, 2, 3))}
TINY = {"steps": 3, "rank": 4, "min_rank": 2, "resolution": 64, "learning_rate": 1e-3}
SIZE = 64
ARTIFACTS = REPO_ROOT / "artifacts" / "workflows"


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text("utf-8"))


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.api.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


# ---- the files ------------------------------------------------------------------------------------

def test_every_workflow_is_there_with_an_api_twin():
    assert set(EXPECTED) <= set(NAMES), f"missing UI workflows: {set(EXPECTED) - set(NAMES)}"
    twins = sorted(p.name.removesuffix(".api.json") for p in API_DIR.glob("*.api.json"))
    assert twins == NAMES
    for name in NAMES:
        ui = load_ui(name)
        assert ui["version"] == 0.4 and ui["nodes"] and isinstance(ui["links"], list), name
        # the picture the templates browser shows (written by make_workflows.py with the real front end)
        with Image.open(WORKFLOWS_DIR / f"{name}.jpg") as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.width >= 320, name


@pytest.mark.parametrize("name", NAMES)
def test_files_are_what_the_generator_writes(name, object_info):
    from support import make_workflows
    from support.workflow_format import build_api, build_ui

    spec = next((w for w in make_workflows.specs(object_info) if w.name == name), None)
    assert spec is not None, f"make_workflows.py no longer makes {name} (or the server lacks one of its node types)"
    hint = "run `.venv/bin/python tests/support/make_workflows.py` and commit workflows/"
    assert load_ui(name) == json.loads(json.dumps(build_ui(spec, object_info))), f"{name}.json is stale: {hint}"
    assert load_api(name) == json.loads(json.dumps(build_api(spec, object_info))), f"{name}.api.json is stale: {hint}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_twins_agree(name, object_info):
    ui, api = load_ui(name), load_api(name)
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in VIRTUAL_NODES}
    assert {k: n["type"] for k, n in ui_nodes.items()} == {k: n["class_type"] for k, n in api.items()}
    links = {row[0]: row for row in ui["links"]}
    for node_id, node in ui_nodes.items():
        literal = {k: v for k, v in api[node_id]["inputs"].items() if not isinstance(v, list)}
        widgets = {k: v for k, v in widget_values_by_name(node, object_info).items() if "." not in k}
        assert widgets == literal, f"{name} node {node_id} ({node['type']}): UI widgets != API inputs"
        wired = {k: v for k, v in api[node_id]["inputs"].items() if isinstance(v, list)}
        ui_wired = {}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                _, src, src_slot, dst, dst_slot, _ = links[slot["link"]]
                assert str(dst) == node_id and node["inputs"][dst_slot]["name"] == slot["name"]
                ui_wired[slot["name"]] = [str(src), src_slot]
        assert ui_wired == wired, f"{name} node {node_id} ({node['type']}): UI links != API links"
        assert display_title(node, object_info) == api[node_id]["_meta"]["title"]
    assert ui_to_api(ui, object_info) == api


def _check_value(node_type, spec, value):
    """Why the server would refuse `value` for input `spec`, or None."""
    if spec.type == "INT" and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"{value!r} is not an INT"
    if spec.type == "FLOAT" and not (isinstance(value, (int, float)) and math.isfinite(value)):
        return f"{value!r} is not a finite FLOAT"
    if spec.type in ("INT", "FLOAT"):
        lo, hi = spec.options.get("min", -math.inf), spec.options.get("max", math.inf)
        if not lo <= value <= hi:
            return f"{value!r} is outside [{lo}, {hi}]"
    if spec.type == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a BOOLEAN"
    if spec.type == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a STRING"
    if spec.type == "COMBO" and (node_type, spec.name) not in FILE_WIDGETS and value not in spec.options["options"]:
        return f"{value!r} is not one of {spec.options['options']}"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_every_input_is_given_and_valid(name, object_info):
    for node_id, node in load_api(name).items():
        specs = {s.name: s for s in input_specs(object_info, node["class_type"])}
        unknown = set(node["inputs"]) - set(specs)
        assert not unknown, f"{name} node {node_id}: inputs the node does not have: {unknown}"
        for spec in specs.values():
            if spec.name not in node["inputs"]:
                assert spec.optional, f"{name} node {node_id}: required input {spec.name!r} is missing"
                continue
            value = node["inputs"][spec.name]
            if isinstance(value, list):
                assert not spec.is_widget or spec.options.get("forceInput"), (name, node_id, spec.name)
                continue
            why = _check_value(node["class_type"], spec, value)
            assert why is None, f"{name} node {node_id} ({node['class_type']}).{spec.name}: {why}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_settings_are_the_papers(name, object_info):
    """The SD workflows hold the paper's recipe and sampler; the family ones leave the recipe to the
    family table ("auto" / 0) and fit memory to the card ("auto")."""
    ui, api = load_ui(name), load_api(name)
    for node_id in find_nodes(api, "TLoraTrainFromImage"):
        inputs = api[node_id]["inputs"]
        if name in FAMILY_WORKFLOWS:
            assert (inputs["variant"], inputs["rank"], inputs["min_rank"], inputs["steps"]) == ("auto", 0, 0, 0), name
            assert inputs["memory"] == "auto" and inputs["learning_rate"] == 0, name  # the recipe's optimiser
        else:
            assert (inputs["rank"], inputs["min_rank"], inputs["steps"]) == (64, 32, 800), (name, node_id)
            assert inputs["learning_rate"] == pytest.approx(1e-4)
        assert inputs["weight_decay"] == pytest.approx(1e-4)
    for node_id in find_nodes(api, "KSampler"):
        inputs = api[node_id]["inputs"]
        if name not in FAMILY_WORKFLOWS:
            assert (inputs["steps"], inputs["cfg"], inputs["sampler_name"]) == (25, 5.0, "euler"), (name, node_id)
    # Seeds stay fixed: "randomize" would train again (800 steps) on every queue.
    for node in ui["nodes"]:
        for key, value in widget_values_by_name(node, object_info).items():
            if key.endswith(".control_after_generate"):
                assert value == "fixed", f"{name} node {node['id']} ({node['type']}) {key} = {value!r}"
    notes = [n for n in ui["nodes"] if n["type"] in VIRTUAL_NODES]
    assert notes and all(n["widgets_values"][0].strip() for n in notes), f"{name}: no explanatory note"


def test_family_workflows_load_the_model_with_its_own_loaders():
    """No family workflow starts from an SD checkpoint loader but SD3.5's (its checkpoint holds MODEL and
    VAE); every one loads the diffusion model's text encoders with a CLIP loader of their own."""
    for name in FAMILY_WORKFLOWS:
        types = {n["class_type"] for n in load_api(name).values()}
        assert ("CheckpointLoaderSimple" in types) == (name == "train_on_sd35"), name
        assert types & {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader"}, name
    assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance"} <= {
        n["class_type"] for n in load_api("train_on_flux").values()}
    assert {"SaveAnimatedWEBP", "Wan22ImageToVideoLatent"} <= {
        n["class_type"] for n in load_api("train_on_wan22").values()}


def test_templates_menu_lists_exactly_the_ui_workflows(comfy_server):
    listed = comfy_server.get("/workflow_templates")
    assert sorted(listed.get(PACK_DIR_NAME, [])) == NAMES, listed
    for name in NAMES:
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}.json") as r:
            assert json.loads(r.read()) == load_ui(name)


# ---- runs on the real server ----------------------------------------------------------------------

def shrink(api: dict, name: str, tlora_file: str | None = None) -> dict:
    """A copy of an API workflow with tiny settings, the test model and image, and test-only file names."""
    wf = copy.deepcopy(api)
    for node_id, node in wf.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = "tiny_sd15.safetensors"
        elif kind == "LoadImage":
            inputs["image"] = "tlora_sample.png"
        elif kind == "TLoraTrainFromImage":
            inputs.update(TINY, filename_prefix=f"wf_test/{name}_{inputs['variant']}")
            if inputs.get("preview_every"):  # one preview, at the last step
                inputs.update(preview_every=TINY["steps"], preview_steps=2)
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE)
        elif kind in ("SaveImage", "TLoraExportLoRA"):
            inputs["filename_prefix"] = f"wf_test/{name}_{inputs['filename_prefix'].replace('/', '_')}"
        elif kind == "TLoraLoad":
            assert tlora_file, f"{name} needs a T-LoRA file"
            inputs["tlora_name"] = tlora_file
    for node_id in find_nodes(wf, "TLoraEvaluate"):
        _shrink_evaluation(wf, node_id)
    return wf


def _shrink_evaluation(wf: dict, node_id: str):
    """Evaluate the files the (shrunk) trainer saves, at r_min 1 and 2, one prompt, 2 steps, 64 px; the random
    ViT-L pair of support.tiny_clip as CLIP Vision and as ts_clip (the tiny SD1.5's CLIP has no projection)."""
    inputs = wf[node_id]["inputs"]
    [train] = find_nodes(wf, "TLoraTrainFromImage")
    wf[train]["inputs"]["save_every"] = 2  # 3 steps: a file at step 2 and the final one
    inputs.update(files=wf[train]["inputs"]["filename_prefix"] + "_*.safetensors", min_ranks="1, 2", steps=2,
                  resolution=SIZE, prompts="a photo of {trigger} {class} on the beach", images_per_prompt=1)
    wf[wf[node_id]["inputs"]["clip_vision"][0]]["inputs"]["clip_name"] = "clip_vit_l_vision.safetensors"
    wf["90"] = {"class_type": "CLIPLoader", "_meta": {"title": "Load CLIP"},
                "inputs": {"clip_name": "clip_vit_l_text.safetensors", "type": "stable_diffusion"}}
    inputs["ts_clip"] = ["90", 0]


def images_of(server, entry, node_id) -> list:
    items = entry["outputs"].get(node_id, {}).get("images", [])
    return [np.asarray(Image.open(server.output_path(item))) for item in items]


def text_of(entry, node_id) -> str:
    texts = entry["outputs"].get(node_id, {}).get("text", [])
    assert len(texts) == 1, entry["outputs"].get(node_id)
    return texts[0]


def tlora_config(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    assert meta.get("tlora.format") == "comfyui-tlora", (path, meta)
    return json.loads(meta["tlora.config"])


@pytest.fixture(scope="module")
def train_run(comfy_server):
    """train_and_sample, shrunk, run once: (api workflow, history entry, T-LoRA file relative to models/loras)."""
    api = shrink(load_api("train_and_sample"), "train_and_sample")
    entry = comfy_server.run(api, timeout=600)
    file_name = text_of(entry, find_node(api, "PreviewAny", title="Saved T-LoRA file"))
    return api, entry, file_name


def test_train_and_sample_runs(comfy_server, train_run):
    api, entry, file_name = train_run
    path = comfy_server.base_dir / "models" / "loras" / file_name
    assert file_name.startswith("wf_test/train_and_sample_tlora_") and path.is_file(), file_name
    config = tlora_config(path)
    assert (config["rank"], config["min_rank"], config["variant"]) == (4, 2, "tlora"), config
    samples = images_of(comfy_server, entry, find_node(api, "SaveImage"))
    assert [s.shape for s in samples] == [(SIZE, SIZE, 3)]
    curves = images_of(comfy_server, entry, find_node(api, "PreviewImage", title="Loss curve"))
    assert len(curves) == 1 and curves[0].ndim == 3 and min(curves[0].shape[:2]) >= 64
    previews = images_of(comfy_server, entry, find_node(api, "PreviewImage", title="Previews while training"))
    assert [p.shape for p in previews] == [(SIZE, SIZE, 3)]


def test_load_and_sample_runs_and_reproduces_the_trained_sample(comfy_server, train_run):
    train_api, train_entry, file_name = train_run
    api = shrink(load_api("load_and_sample"), "load_and_sample", tlora_file=file_name)
    entry = comfy_server.run(api, timeout=300)
    [loaded] = images_of(comfy_server, entry, find_node(api, "SaveImage"))
    [trained] = images_of(comfy_server, train_entry, find_node(train_api, "SaveImage"))
    assert loaded.shape == (SIZE, SIZE, 3)
    # Same prompts, seed, sampler and latent size in both workflows: the file gives the trained model back.
    assert np.array_equal(loaded, trained)


def test_lora_vs_tlora_runs_both_variants(comfy_server):
    api = shrink(load_api("lora_vs_tlora"), "lora_vs_tlora")
    entry = comfy_server.run(api, timeout=900)
    loras = comfy_server.base_dir / "models" / "loras" / "wf_test"
    for variant in ("lora", "tlora"):
        [path] = sorted(loras.glob(f"lora_vs_tlora_{variant}_*.safetensors"))
        assert tlora_config(path)["variant"] == variant
    saves = {api[i]["_meta"]["title"]: images_of(comfy_server, entry, i) for i in find_nodes(api, "SaveImage")}
    assert {k: [a.shape for a in v] for k, v in saves.items()} == {
        "LoRA samples": [(SIZE, SIZE, 3)], "T-LoRA samples": [(SIZE, SIZE, 3)]}
    side_by_side = images_of(comfy_server, entry, find_node(api, "PreviewImage"))
    assert len(side_by_side) == 2
    assert not np.array_equal(saves["LoRA samples"][0], saves["T-LoRA samples"][0]), "the two variants sampled alike"


def test_convert_to_lora_writes_a_lora_the_stock_loader_reads(comfy_server, train_run, object_info):
    _, _, file_name = train_run
    api = shrink(load_api("convert_to_lora"), "convert_to_lora", tlora_file=file_name)
    entry = comfy_server.run(api, timeout=300)
    exported = text_of(entry, find_node(api, "PreviewAny", title="Saved LoRA file"))
    report = text_of(entry, find_node(api, "PreviewAny", title="Export report"))
    path = comfy_server.base_dir / "models" / "loras" / exported
    assert path.is_file() and report.strip(), (exported, report)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in keys), keys[:5]

    # ComfyUI's own LoRA loader maps every key of the exported file (it logs the keys it cannot place).
    assert "LoraLoaderModelOnly" in object_info
    before = comfy_server.log_text().count("lora key not loaded")
    sample = shrink(load_api("load_and_sample"), "convert_to_lora_check", tlora_file=file_name)
    loader = find_node(sample, "TLoraLoad")
    sample[loader] = {"class_type": "LoraLoaderModelOnly", "_meta": {"title": "Load LoRA"},
                      "inputs": {"model": sample[loader]["inputs"]["model"], "lora_name": exported,
                                 "strength_model": 1.0}}
    [image] = images_of(comfy_server, comfy_server.run(sample, timeout=300), find_node(sample, "SaveImage"))
    assert image.shape == (SIZE, SIZE, 3)
    assert comfy_server.log_text().count("lora key not loaded") == before, comfy_server.log_tail()


@pytest.fixture(scope="module")
def clip_vit_l(comfy_server, tmp_path_factory):
    """The random CLIP ViT-L/14 image and text towers (support.tiny_clip) in the server's model folders."""
    from support.tiny_clip import write_clip_vit_l

    vision, text = write_clip_vit_l(tmp_path_factory.mktemp("clip_vit_l"))
    for path, folder in ((vision, "clip_vision"), (text, "text_encoders")):
        (comfy_server.base_dir / "models" / folder).mkdir(parents=True, exist_ok=True)
        (comfy_server.base_dir / "models" / folder / path.name).symlink_to(path)
    return vision, text


def _pareto_by_hand(points):
    return [all(not (q[0] >= p[0] and q[1] >= p[1] and q != p) for q in points) for p in points]


def test_pick_best_checkpoint_measures_every_saved_file(comfy_server, clip_vit_l):
    api = shrink(load_api("pick_best_checkpoint"), "pick_best_checkpoint")
    entry = comfy_server.run(api, timeout=1200)
    table = json.loads(text_of(entry, find_node(api, "PreviewAny", title="Scores (JSON)")))
    chosen = text_of(entry, find_node(api, "PreviewAny", title="Chosen file"))
    loras = comfy_server.base_dir / "models" / "loras"
    saved = sorted(p.relative_to(loras).as_posix()
                   for p in (loras / "wf_test").glob("pick_best_checkpoint_tlora_*.safetensors"))
    assert len(saved) == 2, saved
    rows = table["candidates"]
    # every saved file at r_min 1 and 2; the trainer's TLORA output is the last file, not evaluated twice
    assert [(r["file"], r["r_min"], r["strength"]) for r in rows] == [(f, r, 1.0) for f in saved for r in (1, 2)]
    points = [(r["IS"], r["TS"]) for r in rows]
    assert all(-1 <= v <= 1 for p in points for v in p)
    assert [r["pareto"] for r in rows] == _pareto_by_hand(points)
    # the rule by hand: nearest the ideal point, each score in units of its range
    ideal = [max(p[k] for p in points) for k in (0, 1)]
    span = [(max(p[k] for p in points) - min(p[k] for p in points)) or 1.0 for k in (0, 1)]
    dist = [math.hypot((ideal[0] - p[0]) / span[0], (ideal[1] - p[1]) / span[1]) for p in points]
    assert [r["best"] for r in rows].index(True) == dist.index(min(dist))
    assert chosen == table["best"]["file"] and table["best"]["pareto"]
    [plot] = images_of(comfy_server, entry, find_node(api, "PreviewImage", title="IS against TS"))
    assert plot.shape == (512, 768, 3)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)  # the README's picture (docs/pick_best_checkpoint_plot.png) is a copy
    Image.fromarray(plot).save(ARTIFACTS / "pick_best_checkpoint_plot.png")


# ---- the main job, from the shell ---------------------------------------------------------------

def test_main_job_runs_the_workflow_headless(comfy, tiny_sd15_checkpoint, sample_image, tmp_path):
    """scripts/main_job.py with a given checkpoint and image: its own server, progress, files, a clean stop."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "main_job.py"), "--checkpoint", str(tiny_sd15_checkpoint),
           "--image", str(sample_image), "--comfyui", str(comfy.dir), "--out", str(out), "--device", "cpu",
           "--steps", "2", "--rank", "4", "--min-rank", "2", "--resolution", "64", "--sample-steps", "2",
           "--size", "64", "--preview-every", "1", "--filename-prefix", "tlora/main_job_test"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "step 2/2  loss" in log, log  # the trainer's progress text came through the websocket
    tlora = out / "models" / "loras" / "tlora" / "main_job_test_00001.safetensors"
    assert tlora.is_file() and f"T-LoRA file : {tlora.relative_to(tmp_path)}" in log, log
    assert tlora_config(tlora)["rank"] == 4
    [sample] = sorted((out / "output" / "tlora").glob("sample_*.png"))
    assert Image.open(sample).size == (SIZE, SIZE)
    assert (out / "output" / "tlora" / "main_job_test_00001_loss_curve.png").is_file(), log
    previews = sorted((out / "output" / "tlora").glob("main_job_test_00001_preview_*.png"))
    assert [Image.open(p).size for p in previews] == [(SIZE, SIZE)] * 2 and "previews    : 2 images" in log, log
    # the server was stopped: nothing listens on its port any more
    port = int(log.split("http://127.0.0.1:")[1].split()[0])
    import socket
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"ComfyUI still listens on {port}"
