"""The pack's example workflows, described once and written in both formats.

    .venv/bin/python tests/support/make_workflows.py   # starts a ComfyUI, writes workflows/

writes workflows/<name>.json (UI format: the templates menu lists these), workflows/<name>.jpg (its
picture in the templates menu, drawn by the real front end in headless Chromium; --no-thumbnails skips
it) and workflows/api/<name>.api.json (API format, for scripts; a sub folder so that the templates menu,
which lists only workflows/*.json, does not offer them). Widget order and sockets come from the real
server's /object_info, so the files follow the nodes' schemas. The committed values are the paper's
recipe (rank 64, r_min 32, 800 steps, lr 1e-4, SD-XL at 1024 px, Euler 25 steps CFG 5); tests shrink
them in a copy at run time.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.workflow_format import NodeSpec, WorkflowSpec, build_api, build_ui  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"

CHECKPOINT = "sd_xl_base_1.0.safetensors"
IMAGE = "example.png"            # ComfyUI ships input/example.png; replace it with your subject's photo
TLORA_PREFIX = "tlora/sks_dog"   # the trainer saves models/loras/tlora/sks_dog_00001.safetensors
TLORA_FILE = TLORA_PREFIX + "_00001.safetensors"
POSITIVE = "a photo of sks dog on the beach, golden hour"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
SAMPLER = {"seed": 42, "seed.control_after_generate": "fixed", "steps": 25, "cfg": 5.0,
           "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
LATENT = {"width": 1024, "height": 1024, "batch_size": 1}
PAPER = {"trigger": "sks", "class_word": "dog", "prompt_template": "a photo of {trigger} {class}",
         "variant": "tlora", "rank": 64, "min_rank": 32, "steps": 800, "learning_rate": 1e-4,
         "seed": 0}

GREEN = {"color": "#232", "bgcolor": "#353"}
RED = {"color": "#322", "bgcolor": "#533"}

KNOBS = """\
Knobs of "Train T-LoRA from image" (the paper's values are the defaults)
- rank (64): components per layer. More = more capacity, bigger file.
- min_rank = r_min (32): components kept at the noisiest steps. LOWER = more diversity and better prompt
  following (less copying of the photo's background and pose); HIGHER = more fidelity to the subject.
  Load / Apply T-LoRA can override it at sampling time, no retraining needed.
- steps (800), learning_rate (1e-4): the paper's recipe. Too many steps overfit: the photo comes back
  whatever the prompt says. learning_rate 0 = the optimizer's recipe (AdamW 1e-4; Prodigy 1.0).
- optimizer (optional, auto): the family's reference recipe, AdamW for SD (the paper), Prodigy with
  gradient clipping for Flux and the other flow transformers (the reference FLUX code).
- variant: tlora (paper) | vanilla_tlora (mask only) | ortho_lora (orthogonal init only) | lora (plain LoRA).
- trigger + class_word make the training prompt "a photo of sks dog": use both words in your prompts.
- seed has no randomize control: queueing again reuses the trained T-LoRA instead of training again.
- optional: mask (white = subject), resolution (0 = the model's native size), targets,
  gradient_checkpointing (less memory, slower), save_every (100: pick the best step afterwards), resume
  (continue a T-LoRA).
- preview_every (100 here, 0 = off): an image with the T-LoRA as it is, shown on the node and kept in the
  'previews' output. The subject appearing while the beach (preview_prompt) stays = good; the photo's
  background coming back = stop earlier or lower min_rank.
- strength (on Load / Apply T-LoRA): 0 = the base model exactly, 1 = as trained."""


def _note(node_id, pos, size, text):
    return NodeSpec(node_id, "Note", pos, {"text": text}, size=size)


def _sampling(first_id, x, y, model_link, clip_link, vae_link, save_prefix, positive=POSITIVE):
    """Prompts, latent, KSampler, decode, save: nodes first_id .. first_id+5 and their links."""
    pos_id, neg_id, lat_id, ks_id, dec_id, save_id = range(first_id, first_id + 6)
    nodes = [
        NodeSpec(pos_id, "CLIPTextEncode", (x, y), {"text": positive}, "Positive prompt", (400, 160), **GREEN),
        NodeSpec(neg_id, "CLIPTextEncode", (x, y + 210), {"text": NEGATIVE}, "Negative prompt", (400, 160), **RED),
        NodeSpec(lat_id, "EmptyLatentImage", (x, y + 420), dict(LATENT), size=(400, 110)),
        NodeSpec(ks_id, "KSampler", (x + 450, y), dict(SAMPLER), size=(320, 270)),
        NodeSpec(dec_id, "VAEDecode", (x + 450, y + 320), size=(320, 50)),
        NodeSpec(save_id, "SaveImage", (x + 820, y), {"filename_prefix": save_prefix}, "Save samples", (420, 460)),
    ]
    links = [(*clip_link, pos_id, "clip"), (*clip_link, neg_id, "clip"),
             (*model_link, ks_id, "model"), (pos_id, "CONDITIONING", ks_id, "positive"),
             (neg_id, "CONDITIONING", ks_id, "negative"), (lat_id, "LATENT", ks_id, "latent_image"),
             (ks_id, "LATENT", dec_id, "samples"), (*vae_link, dec_id, "vae"), (dec_id, "IMAGE", save_id, "images")]
    return nodes, links


def train_and_sample() -> WorkflowSpec:
    nodes = [
        NodeSpec(1, "CheckpointLoaderSimple", (40, 40), {"ckpt_name": CHECKPOINT}, size=(320, 100)),
        NodeSpec(2, "LoadImage", (40, 190), {"image": IMAGE}, "Subject photo", (320, 360)),
        NodeSpec(3, "TLoraTrainFromImage", (400, 40), dict(PAPER, filename_prefix=TLORA_PREFIX, preview_every=100),
                 size=(340, 670)),
        NodeSpec(10, "PreviewImage", (400, 730), title="Loss curve", size=(340, 300)),
        NodeSpec(14, "PreviewImage", (780, 730), title="Previews while training", size=(400, 300)),
        NodeSpec(11, "PreviewAny", (780, 590), title="Saved T-LoRA file", size=(400, 110)),
        _note(12, (1230, 530), (790, 250), KNOBS),
        _note(13, (40, 600), (320, 430),
              "Train a T-LoRA on one photo, then sample with it.\n\n1. Pick your checkpoint (SD-XL as in the "
              "paper, or SD1.5: then set the latent to 512 x 512).\n2. Load ONE photo of the subject.\n"
              "3. Queue. Training shows 'step / loss' and a preview every 100 steps on its node; the file "
              "goes to models/loras/"
              f"{TLORA_PREFIX}_NNNNN.safetensors.\n4. Change the prompt and queue again: only sampling runs.\n\n"
              "Reuse the file later with the 'load_and_sample' workflow."),
    ]
    sampling, links = _sampling(4, 780, 40, (3, "MODEL"), (1, "CLIP"), (1, "VAE"), "tlora/sample")
    nodes[3:3] = sampling
    links = [(1, "MODEL", 3, "model"), (1, "CLIP", 3, "clip"), (1, "VAE", 3, "vae"), (2, "IMAGE", 3, "image"),
             *links, (3, "loss_curve", 10, "images"), (3, "file", 11, "source"), (3, "previews", 14, "images")]
    return WorkflowSpec("train_and_sample", nodes, links)


def load_and_sample() -> WorkflowSpec:
    nodes = [
        NodeSpec(1, "CheckpointLoaderSimple", (40, 40), {"ckpt_name": CHECKPOINT}, size=(320, 100)),
        NodeSpec(2, "TLoraLoad", (40, 190), {"tlora_name": TLORA_FILE, "strength": 1.0, "min_rank": 0,
                                             "exponent": 0.0}, size=(320, 160)),
        _note(9, (40, 400), (320, 250),
              "Sample with a saved T-LoRA.\n\n- tlora_name: a file under models/loras (the trainer's, the "
              "reference code's SD-XL / FLUX files, LyCORIS tlora).\n- strength: 0 = the base model exactly, "
              "1 = as trained.\n- min_rank: 0 = the file's r_min. LOWER = more diversity and prompt following, "
              "HIGHER = more fidelity to the subject.\n- exponent: 0 = the file's; bends the rank schedule."),
    ]
    sampling, links = _sampling(3, 400, 40, (2, "MODEL"), (1, "CLIP"), (1, "VAE"), "tlora/loaded")
    nodes[2:2] = sampling
    links = [(1, "MODEL", 2, "model"), *links]
    return WorkflowSpec("load_and_sample", nodes, links)


def lora_vs_tlora() -> WorkflowSpec:
    """One photo trained twice (plain LoRA, T-LoRA), both sampled with the same prompts and seed."""
    nodes = [
        NodeSpec(1, "CheckpointLoaderSimple", (40, 40), {"ckpt_name": CHECKPOINT}, size=(320, 100)),
        NodeSpec(2, "LoadImage", (40, 190), {"image": IMAGE}, "Subject photo", (320, 360)),
        NodeSpec(3, "CLIPTextEncode", (400, 40), {"text": POSITIVE}, "Positive prompt", (400, 160), **GREEN),
        NodeSpec(4, "CLIPTextEncode", (400, 250), {"text": NEGATIVE}, "Negative prompt", (400, 160), **RED),
        NodeSpec(5, "EmptyLatentImage", (400, 460), dict(LATENT), size=(400, 110)),
    ]
    links = [(1, "CLIP", 3, "clip"), (1, "CLIP", 4, "clip")]
    groups = []
    for row, (variant, label, first_id) in enumerate((("lora", "LoRA", 10), ("tlora", "T-LoRA", 20))):
        y = 40 + 760 * row
        train, ks, dec, save = first_id, first_id + 1, first_id + 2, first_id + 3
        nodes += [
            NodeSpec(train, "TLoraTrainFromImage", (880, y),
                     dict(PAPER, variant=variant, filename_prefix=f"tlora/compare_{variant}"),
                     f"Train {label}", (340, 640)),
            NodeSpec(ks, "KSampler", (1260, y), dict(SAMPLER), f"KSampler ({label})", (320, 270)),
            NodeSpec(dec, "VAEDecode", (1260, y + 320), size=(320, 50)),
            NodeSpec(save, "SaveImage", (1620, y), {"filename_prefix": f"tlora/compare_{variant}"},
                     f"{label} samples", (420, 460)),
        ]
        links += [(1, "MODEL", train, "model"), (1, "CLIP", train, "clip"), (1, "VAE", train, "vae"),
                  (2, "IMAGE", train, "image"), (train, "MODEL", ks, "model"), (3, "CONDITIONING", ks, "positive"),
                  (4, "CONDITIONING", ks, "negative"), (5, "LATENT", ks, "latent_image"),
                  (ks, "LATENT", dec, "samples"), (1, "VAE", dec, "vae"), (dec, "IMAGE", save, "images")]
        groups.append({"id": row + 1, "title": f"{label}{' (baseline)' if variant == 'lora' else ''}",
                       "bounding": [860, y - 50, 1200, 720], "color": ("#3f789e", "#8A8")[row],
                       "font_size": 24, "flags": {}})
    nodes += [
        NodeSpec(30, "ImageBatch", (400, 1010), title="Side by side", size=(400, 50)),
        NodeSpec(31, "PreviewImage", (400, 1110), title="LoRA | T-LoRA", size=(400, 400)),
        _note(32, (40, 600), (320, 420),
              "LoRA vs T-LoRA on the same photo: same rank, steps, learning rate and seed, same prompts and "
              "sampler seed; only 'variant' differs.\n\nWith one training image a plain LoRA tends to copy "
              "the photo's background and pose whatever the prompt; T-LoRA keeps the subject and follows the "
              "prompt better. Try prompts that move the subject: 'sks dog in the snow', 'a watercolor "
              "painting of sks dog'.\n\nBoth runs train 800 steps: this takes twice as long as one."),
    ]
    links += [(12, "IMAGE", 30, "image1"), (22, "IMAGE", 30, "image2"), (30, "IMAGE", 31, "images")]
    return WorkflowSpec("lora_vs_tlora", nodes, links, groups)


def convert_to_lora() -> WorkflowSpec:
    nodes = [
        NodeSpec(1, "CheckpointLoaderSimple", (40, 40), {"ckpt_name": CHECKPOINT}, size=(320, 100)),
        NodeSpec(2, "TLoraLoad", (400, 40), {"tlora_name": TLORA_FILE, "strength": 1.0, "min_rank": 0,
                                             "exponent": 0.0}, size=(320, 160)),
        NodeSpec(3, "TLoraExportLoRA", (760, 40), {"timestep": 0, "rank": 0, "storage": "fp16",
                                                   "filename_prefix": "tlora/sks_dog_lora"}, size=(340, 170)),
        NodeSpec(4, "PreviewAny", (1140, 40), title="Saved LoRA file", size=(400, 110)),
        NodeSpec(5, "PreviewAny", (1140, 190), title="Export report", size=(400, 200)),
        _note(6, (40, 250), (680, 300),
              "Export a T-LoRA as an ordinary LoRA (lora_up / lora_down / alpha) for tools without T-LoRA "
              "support; load it with the stock 'Load LoRA' node.\n\nA standard LoRA has no timestep mask, so "
              "one timestep's mask is frozen:\n- timestep 0 = full rank (most detail), 999 = r_min only.\n"
              "- rank 0 = exact (up to 2 x rank components); k > 0 = best rank-k approximation, with its "
              "error in the report.\n\nThe file goes to models/loras/<filename_prefix>_NNNNN.safetensors."),
    ]
    links = [(1, "MODEL", 2, "model"), (2, "TLORA", 3, "tlora"), (3, "file", 4, "source"),
             (3, "report", 5, "source")]
    return WorkflowSpec("convert_to_lora", nodes, links)


SWEEP_PREFIX = "tlora/sweep"
CLIP_VISION = "clip_vision_g.safetensors"  # CLIP ViT-bigG/14: the image tower of SD-XL's second text encoder


def pick_best_checkpoint() -> WorkflowSpec:
    """Train with save_every, then measure every saved file at three r_min values with the paper's IS / TS."""
    nodes = [
        NodeSpec(1, "CheckpointLoaderSimple", (40, 40), {"ckpt_name": CHECKPOINT}, size=(320, 100)),
        NodeSpec(2, "LoadImage", (40, 190), {"image": IMAGE}, "Subject photo", (320, 360)),
        NodeSpec(3, "TLoraTrainFromImage", (400, 40), dict(PAPER, filename_prefix=SWEEP_PREFIX, save_every=200),
                 size=(340, 640)),
        NodeSpec(4, "CLIPVisionLoader", (400, 730), {"clip_name": CLIP_VISION}, size=(340, 60)),
        NodeSpec(5, "TLoraEvaluate", (780, 40), {
            "files": SWEEP_PREFIX + "_*.safetensors", "trigger": "sks", "class_word": "dog",
            "min_ranks": "16, 32, 48", "strengths": "1.0", "seed": 0,
            "images_per_prompt": 1, "steps": 25, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "resolution": 0}, size=(400, 640)),
        NodeSpec(6, "PreviewImage", (1220, 40), title="IS against TS", size=(520, 380)),
        NodeSpec(7, "PreviewAny", (1220, 460), title="Chosen file", size=(520, 110)),
        NodeSpec(8, "PreviewAny", (1220, 610), title="Scores (JSON)", size=(520, 300)),
        _note(9, (40, 600), (320, 430),
              "Pick the best checkpoint with the paper's metrics.\n\n1. Training saves a file every 200 steps "
              f"(models/loras/{SWEEP_PREFIX}_NNNNN.safetensors).\n2. Evaluate samples the prompts with every saved "
              "file at r_min 16, 32 and 48 and measures IS (CLIP image similarity to the photo) and TS (CLIP "
              "similarity to the prompt without 'sks').\n3. The plot shows IS against TS; the red ring is the best "
              "trade-off, its file is shown.\n\nCLIP Vision: clip_vision_g (ViT-bigG) is the twin of SD-XL's "
              "text encoder, so TS needs nothing else. For SD 1.5 load CLIP ViT-L/14 for vision and the same "
              "file with Load CLIP into 'ts_clip'.\n\n8 prompts x 12 candidates x 25 steps: this takes a while."),
    ]
    links = [(1, "MODEL", 3, "model"), (1, "CLIP", 3, "clip"), (1, "VAE", 3, "vae"), (2, "IMAGE", 3, "image"),
             (1, "MODEL", 5, "model"), (1, "CLIP", 5, "clip"), (1, "VAE", 5, "vae"),
             (4, "CLIP_VISION", 5, "clip_vision"), (2, "IMAGE", 5, "image"), (3, "TLORA", 5, "tlora"),
             (5, "plot", 6, "images"), (5, "best_file", 7, "source"), (5, "table", 8, "source")]
    return WorkflowSpec("pick_best_checkpoint", nodes, links)


# ---- one workflow per family group: the model's own loaders, the family's recipe ("auto" / 0) -----------

FAMILY_KNOBS = """\
Train T-LoRA on {title}: the family's recipe
- variant auto, rank 0, min_rank 0, steps 0 = the family's recipe (DiTs: Vanilla T-LoRA, rank 32,
  r_min 1, 1000 steps at 1024 px, as the reference FLUX code; README 'Model families').
- memory auto: fits training on your GPU's free memory (gradient checkpointing, resolution; the log says
  when it assumes an fp8 base: then pick weight_dtype fp8_e4m3fn in Load Diffusion Model). Or choose your
  card (8 / 12 / 16 / 24 GB; README 'What fits on your card'); off = the settings as they are.
- The Train node encodes 'a photo of sks dog' with the CLIP connected to it.
- preview_every 100: an image with the T-LoRA as it is, on the node and in 'previews'."""


def _family_training(x, y, model_link, clip_link, vae_link, key, title, note):
    """Subject photo, Train node (recipe, memory auto), loss curve, file, previews: nodes 2, 3, 10-14."""
    nodes = [
        NodeSpec(2, "LoadImage", (x, y), {"image": IMAGE}, "Subject photo", (320, 360)),
        NodeSpec(3, "TLoraTrainFromImage", (x + 360, y - 150),
                 dict(PAPER, variant="auto", rank=0, min_rank=0, steps=0, learning_rate=0.0,  # the recipe's optimiser
                      filename_prefix=f"tlora/{key}_sks_dog", preview_every=100, memory="auto"), size=(340, 700)),
        NodeSpec(10, "PreviewImage", (x + 360, y + 590), title="Loss curve", size=(340, 300)),
        NodeSpec(11, "PreviewAny", (x + 740, y + 450), title="Saved T-LoRA file", size=(400, 110)),
        NodeSpec(14, "PreviewImage", (x + 740, y + 590), title="Previews while training", size=(400, 300)),
        _note(12, (x + 1190, y + 450), (700, 250), FAMILY_KNOBS.format(title=title)),
        _note(13, (x, y + 400), (320, 500), note),
    ]
    links = [(*model_link, 3, "model"), (*clip_link, 3, "clip"), (*vae_link, 3, "vae"), (2, "IMAGE", 3, "image"),
             (3, "loss_curve", 10, "images"), (3, "file", 11, "source"), (3, "previews", 14, "images")]
    return nodes, links


def _family_sampling(x, y, model_link, clip_link, vae_link, sampler, latent, save_prefix, guidance=None,
                     positive=POSITIVE, video_fps=None):
    """Prompts (FluxGuidance on the positive one when `guidance`), latent (type, widgets, title; one that
    takes a VAE gets it), KSampler, decode, then SaveImage, or an animated WebP at `video_fps` (SaveAnimatedWEBP:
    the same widgets on both hosts, where CreateVideo gained one in 0.33): nodes 20-26."""
    latent_type, latent_widgets, latent_title = latent
    nodes = [
        NodeSpec(20, "CLIPTextEncode", (x, y), {"text": positive}, "Positive prompt", (400, 160), **GREEN),
        NodeSpec(21, "CLIPTextEncode", (x, y + 210), {"text": NEGATIVE}, "Negative prompt", (400, 160), **RED),
        NodeSpec(22, latent_type, (x, y + 420), latent_widgets, latent_title, (400, 170)),
        NodeSpec(23, "KSampler", (x + 450, y), dict(sampler), size=(320, 270)),
        NodeSpec(24, "VAEDecode", (x + 450, y + 320), size=(320, 50)),
    ]
    links = [(*clip_link, 20, "clip"), (*clip_link, 21, "clip"), (*model_link, 23, "model"),
             (21, "CONDITIONING", 23, "negative"), (22, "LATENT", 23, "latent_image"),
             (23, "LATENT", 24, "samples"), (*vae_link, 24, "vae")]
    if latent_type == "Wan22ImageToVideoLatent":
        links.append((*vae_link, 22, "vae"))
    if guidance is None:
        links.append((20, "CONDITIONING", 23, "positive"))
    else:
        nodes.append(NodeSpec(26, "FluxGuidance", (x + 450, y + 420), {"guidance": guidance}, "Flux guidance",
                              (320, 60)))
        links += [(20, "CONDITIONING", 26, "conditioning"), (26, "CONDITIONING", 23, "positive")]
    if video_fps is None:
        nodes.append(NodeSpec(25, "SaveImage", (x + 820, y), {"filename_prefix": save_prefix}, "Save samples",
                              (420, 460)))
        links.append((24, "IMAGE", 25, "images"))
    else:
        nodes.append(NodeSpec(25, "SaveAnimatedWEBP", (x + 820, y), {"filename_prefix": save_prefix, "fps": video_fps,
                                                                      "lossless": False, "quality": 90},
                              "Save video (animated WebP)", (420, 520)))
        links.append((24, "IMAGE", 25, "images"))
    return nodes, links


def _sampler(steps, cfg, sampler="euler", scheduler="simple"):
    return dict(SAMPLER, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler)


def _diffusion_loaders(unet, vae, clip_node):
    """Load Diffusion Model (1), Load VAE (5) and the family's text-encoder loader (4)."""
    return [NodeSpec(1, "UNETLoader", (40, 40), {"unet_name": unet, "weight_dtype": "default"},
                     "Load Diffusion Model", (320, 110)),
            clip_node,
            NodeSpec(5, "VAELoader", (40, 330), {"vae_name": vae}, "Load VAE", (320, 60))]


def _family_workflow(name, key, title, loaders, model_link, clip_link, vae_link, note, sampler,
                     latent=("EmptySD3LatentImage", LATENT, "Empty latent"), sampling_model=None,
                     **sampling) -> WorkflowSpec:
    """Loaders, training, sampling with the trained model (through `sampling_model`, a ModelSampling
    node on the Train node's MODEL, when the family's sampling wants one)."""
    nodes, links = list(loaders), []
    train, train_links = _family_training(40, 460, model_link, clip_link, vae_link, key, title, note)
    trained = (3, "MODEL")
    if sampling_model is not None:
        nodes.append(sampling_model)
        links.append((3, "MODEL", sampling_model.id, "model"))
        trained = (sampling_model.id, "MODEL")
    sampling, sampling_links = _family_sampling(1190, 40, trained, clip_link, vae_link, sampler, latent,
                                                f"tlora/{key}_sample", **sampling)
    return WorkflowSpec(name, nodes + train + sampling, train_links + links + sampling_links)


def _loaders_note(title, files):
    return (f"Train a T-LoRA on {title} from one photo, then sample with it.\n\n1. Pick your files:\n"
            + "\n".join(f"   - {f}" for f in files)
            + "\n2. Load ONE photo of the subject.\n3. Queue: training shows 'step / loss' and a preview every "
              "100 steps; the file goes to models/loras/tlora/.\n4. Change the prompt and queue again: only "
              "sampling runs.")


def train_on_flux() -> WorkflowSpec:
    clip = NodeSpec(4, "DualCLIPLoader", (40, 180), {"clip_name1": "clip_l.safetensors",
                                                     "clip_name2": "t5xxl_fp8_e4m3fn.safetensors", "type": "flux"},
                    "Load CLIP-L + T5-XXL", (320, 130))
    loaders = _diffusion_loaders("flux1-dev.safetensors", "ae.safetensors", clip)
    note = _loaders_note("FLUX.1-dev (or schnell, Chroma)", [
        "Load Diffusion Model: flux1-dev (weight_dtype fp8_e4m3fn on cards under 24 GB)",
        "DualCLIPLoader: clip_l + t5xxl, type flux", "Load VAE: ae (Flux's)"]) + (
        "\n\nSampling: CFG 1 with FluxGuidance 3.5 (training uses guidance 1, as the reference FLUX code).")
    return _family_workflow("train_on_flux", "flux", "Flux", loaders, (1, "MODEL"), (4, "CLIP"), (5, "VAE"), note,
                            _sampler(20, 1.0), guidance=3.5)


def train_on_qwen_image() -> WorkflowSpec:
    clip = NodeSpec(4, "CLIPLoader", (40, 180), {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                                 "type": "qwen_image"}, "Load CLIP", (320, 110))
    loaders = _diffusion_loaders("qwen_image_fp8_e4m3fn.safetensors", "qwen_image_vae.safetensors", clip)
    note = _loaders_note("Qwen-Image", ["Load Diffusion Model: qwen_image (fp8)",
                                        "Load CLIP: qwen_2.5_vl_7b, type qwen_image", "Load VAE: qwen_image_vae"])
    shift = NodeSpec(6, "ModelSamplingAuraFlow", (820, 40), {"shift": 3.1}, "Sampling shift", (320, 60))
    return _family_workflow("train_on_qwen_image", "qwen_image", "Qwen-Image", loaders, (1, "MODEL"), (4, "CLIP"),
                            (5, "VAE"), note, _sampler(20, 2.5), sampling_model=shift)


def train_on_z_image() -> WorkflowSpec:
    clip = NodeSpec(4, "CLIPLoader", (40, 180), {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2"},
                    "Load CLIP", (320, 110))
    loaders = _diffusion_loaders("z_image_turbo_bf16.safetensors", "ae.safetensors", clip)
    note = _loaders_note("Z-Image (or Lumina 2)", ["Load Diffusion Model: z_image_turbo (or z_image base)",
                                                   "Load CLIP: qwen_3_4b, type lumina2", "Load VAE: ae (Flux's)"]) + (
        "\n\nSampling: 8 steps at CFG 1 for Turbo; Z-Image base wants about 30 steps at CFG 4.")
    shift = NodeSpec(6, "ModelSamplingAuraFlow", (820, 40), {"shift": 3.0}, "Sampling shift", (320, 60))
    return _family_workflow("train_on_z_image", "z_image", "Z-Image", loaders, (1, "MODEL"), (4, "CLIP"), (5, "VAE"),
                            note, _sampler(8, 1.0), sampling_model=shift)


def train_on_sd35() -> WorkflowSpec:
    loaders = [
        NodeSpec(1, "CheckpointLoaderSimple", (40, 40), {"ckpt_name": "sd3.5_large.safetensors"}, "Load Checkpoint",
                 (320, 100)),
        NodeSpec(4, "TripleCLIPLoader", (40, 180), {"clip_name1": "clip_l.safetensors",
                                                    "clip_name2": "clip_g.safetensors",
                                                    "clip_name3": "t5xxl_fp8_e4m3fn.safetensors"},
                 "Load CLIP (SD3)", (320, 130)),
    ]
    note = _loaders_note("SD3.5 (Large or Medium)", ["Load Checkpoint: sd3.5_large (its MODEL and VAE)",
                                                     "TripleCLIPLoader: clip_l, clip_g, t5xxl"])
    return _family_workflow("train_on_sd35", "sd35", "SD3.5", loaders, (1, "MODEL"), (4, "CLIP"), (1, "VAE"), note,
                            _sampler(28, 4.5))


def train_on_wan22() -> WorkflowSpec:
    """Trained on the photo as a one-frame video; sampled as a short video (Wan 2.2 5B, text to video)."""
    clip = NodeSpec(4, "CLIPLoader", (40, 180), {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"},
                    "Load CLIP", (320, 110))
    loaders = _diffusion_loaders("wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors", clip)
    note = _loaders_note("Wan 2.2 5B (TI2V)", ["Load Diffusion Model: wan2.2_ti2v_5B",
                                               "Load CLIP: umt5_xxl, type wan", "Load VAE: wan2.2_vae"]) + (
        "\n\nThe photo trains as a one-frame video; the sample is a 33-frame clip (about 1.4 s at 24 fps).")
    shift = NodeSpec(6, "ModelSamplingSD3", (820, 40), {"shift": 8.0}, "Sampling shift", (320, 60))
    # the 5B model's latent: 48 channels at 1/16 size, 33 frames, made by Wan22ImageToVideoLatent (no start image)
    latent = ("Wan22ImageToVideoLatent", {"width": 1280, "height": 704, "length": 33, "batch_size": 1},
              "Empty video latent")
    return _family_workflow("train_on_wan22", "wan22", "Wan 2.2", loaders, (1, "MODEL"), (4, "CLIP"), (5, "VAE"),
                            note, _sampler(20, 5.0, "uni_pc"), latent, sampling_model=shift, video_fps=24.0,
                            positive="a video of sks dog running on the beach, golden hour")


FAMILY_WORKFLOWS = (train_on_flux, train_on_qwen_image, train_on_z_image, train_on_sd35, train_on_wan22)
ALL = (train_and_sample, load_and_sample, lora_vs_tlora, convert_to_lora, pick_best_checkpoint, *FAMILY_WORKFLOWS)


def specs(object_info: dict) -> list[WorkflowSpec]:
    """The workflows whose node types the server knows (convert_to_lora needs TLoraExportLoRA)."""
    out = []
    for make in ALL:
        wf = make()
        if all(n.type in object_info or n.type in ("Note", "MarkdownNote") for n in wf.nodes):
            out.append(wf)
    return out


def write_all(object_info: dict, folder: Path = WORKFLOWS_DIR) -> list[Path]:
    written = []
    (folder / "api").mkdir(parents=True, exist_ok=True)
    for wf in specs(object_info):
        for path, data in ((folder / f"{wf.name}.json", build_ui(wf, object_info)),
                           (folder / "api" / f"{wf.name}.api.json", build_api(wf, object_info))):
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
    return written


def write_thumbnails(url: str, folder: Path = WORKFLOWS_DIR) -> list[Path]:
    """workflows/<name>.jpg, the picture the templates browser shows for each workflow: the graph as the
    front end at `url` draws it (needs Chromium and chromedriver, see support.frontend)."""
    from support.frontend import FrontEnd, find_chromium

    browser, driver, why_not = find_chromium()
    if why_not:
        raise RuntimeError(why_not)
    fe = FrontEnd(browser, driver).open(url)
    try:
        written = []
        for path in sorted(folder.glob("*.json")):
            fe.load_workflow(json.loads(path.read_text("utf-8")), path.stem)
            written.append(fe.thumbnail(path.with_suffix(".jpg")))
        return written
    finally:
        fe.quit()


def main(argv=None):
    import argparse
    import tempfile

    from support import comfy_env
    from support.comfy_server import ComfyServer, prepare_base_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-thumbnails", action="store_true", help="write the JSON files only")
    cli = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tlora-make-workflows-") as tmp:
        server = ComfyServer(comfy_env.comfyui_dir(), prepare_base_dir(Path(tmp), REPO_ROOT)).start()
        try:
            written = write_all(server.object_info())
            if not cli.no_thumbnails:
                written += write_thumbnails(server.url)
        finally:
            server.stop()
    for p in written:
        print(p.relative_to(REPO_ROOT))


if __name__ == "__main__":
    main()
