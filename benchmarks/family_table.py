"""One table for every model family: sampling step T-LoRA / bare, training step T-LoRA / plain LoRA.

    .venv/bin/python benchmarks/family_table.py                       # every family, native size, 1 block
    .venv/bin/python benchmarks/family_table.py --only flux,sdxl --px 512 --blocks 1 --rounds 2
    .venv/bin/python benchmarks/family_table.py --dry-run             # tiny widths, 64 px: checks the plan

Each family's diffusion model is built at its REAL widths (hidden size, heads, text width) with fewer
blocks (--blocks) by the host's own detector, from a few key shapes of the real checkpoint (the subjects
of memory_estimate.py, block keys cut down to --blocks) or, for the UNets, from their published config
(one res block per level, at most --blocks transformer layers per attention block), then loaded with
random weights. SD1.5 runs at 512 px, the others at 1024 px (the recipe's size) unless --px.
- Sampling: comfy.sample.sample (euler, the family's preview CFG: a batch of 2 per model call where CFG
  is not 1), bare model against Apply T-LoRA of the family's recipe (rank, r_min, variant, attention
  targets of tlora_core/families.py; factors moved off their init so dW is not zero).
- Training: train_tlora with the family's recipe (optimizer, rank, r_min, targets), variant T-LoRA
  against plain LoRA ("lora", same rank and layers), fp32 on the CPU, bf16 autocast on CUDA.
- Training memory: the allocator's peak over one more T-LoRA run (memory_counts.AllocatorPeak) beside
  memory_estimate.py's meta-device count of the same model on the same basis (adapter, optimizer states
  and what autograd saves; the weights too on CUDA, where the trainer loads them inside the window).
Times: one process per family; rows interleaved round by round (reversed every other round), the first
step of every run left out; medians of wall and of process CPU time (on a shared CPU the steadier one).
--dry-run builds each family from tests/support/tiny_families.py (tiny widths) and runs one round of 2
steps at 64 px, all in one process: the test suite runs it (tests/test_family_table.py) so that the script
cannot rot; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import memory_estimate  # (first: it sets ComfyUI's flags before setup_pack may turn the GPU on)
import memory_counts
import sampling_step as common
import train_step

# table row -> (memory_estimate subject, its tests/support/tiny_families entry for --dry-run)
ROWS = {"sd15": ("sd15", None), "sdxl": ("sdxl", "sdxl"), "flux": ("flux_dev", "flux_dev"),
        "sd35": ("sd35_medium", "sd35"), "zimage": ("zimage", "zimage"), "qwen_image": ("qwen_image", "qwen_image")}
MIB = 2 ** 20
BLOCK_KEYS = ("double_blocks.", "single_blocks.", "joint_blocks.", "layers.", "transformer_blocks.")


def few_blocks_unet(config: dict, blocks: int) -> dict:
    """A UNet config with one res block per level and at most `blocks` transformer layers per attention
    block; widths, levels and everything the detector looks at stay."""
    levels = len(config["channel_mult"])
    per_level = [config["transformer_depth"][i * config["num_res_blocks"][i]] for i in range(levels)]
    depth = [min(d, blocks) for d in per_level]
    return dict(config, num_res_blocks=[1] * levels, transformer_depth=depth,
                transformer_depth_output=[d for d in depth for _ in range(2)],
                transformer_depth_middle=min(config["transformer_depth_middle"], blocks))


def few_blocks_keys(keys: dict, blocks: int) -> dict:
    """A detector's key shapes with block keys only for the first `blocks` blocks of each kind."""
    def index(key):
        for prefix in BLOCK_KEYS:
            if key.startswith(prefix):
                return int(key[len(prefix):].split(".")[0])
        return -1
    return {k: s for k, s in keys.items() if index(k) < blocks}


def real_width_spec(row: str, blocks: int):
    """(TinyFamily at the family's real widths with `blocks` blocks, memory_estimate Subject)."""
    from support.tiny_families import TinyFamily
    subject = next(s for s in memory_estimate.SUBJECTS if s.key == ROWS[row][0])
    pooled = {"sdxl": 1280}.get(row, subject.pooled)  # SD-XL's text encoders pool 1280 (ComfyUI adds the sizes)
    extra = {"guidance": 3.5} if subject.guidance else {}
    if subject.unet is not None:
        config = few_blocks_unet(dict(subject.unet, num_heads=subject.unet.get("num_heads", -1)), blocks)
        if row == "sdxl":
            config.update(adm_in_channels=2816, num_classes="sequential")
        cls = {"sd15": "SD15", "sdxl": "SDXL"}[row]
        return TinyFamily(row, {}, {}, subject.context[1], pooled, extra, cls, unet_config=config), subject
    overrides = {"sd35": {"num_blocks": blocks}, "zimage": {"n_refiner_layers": blocks}}.get(row, {})
    config_class = "ZImage" if row == "zimage" else ""
    return TinyFamily(row, few_blocks_keys(subject.detect, blocks), overrides, subject.context[1], pooled, extra,
                      config_class, frames=subject.frames), subject


@dataclass
class FamilySetup:
    """What sampling_step.sample_once needs to sample one family, and what the rows share."""

    row: str
    spec: object          # tests/support/tiny_families.TinyFamily
    tokens: int           # text tokens of the conditioning
    px: int
    patcher: object = None

    @property
    def family(self):
        from tlora_pack.trainer.train import model_family
        return model_family(self.patcher.model)

    @property
    def cfg(self) -> float:
        return self.family.recipe.preview.cfg

    @property
    def scheduler(self) -> str:
        return "normal" if self.spec.unet_config else "simple"

    @property
    def side(self) -> int:
        return self.px // 8

    def latent_shape(self, side: int) -> tuple:
        from support.tiny_families import latent_shape
        return latent_shape(self.patcher, self.spec, 1, side * 8)

    def conditioning(self, seed: int):
        from support.tiny_families import conditioning
        return conditioning(self.spec, seed, self.tokens)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.patcher.model.diffusion_model.parameters())
        tokens = (self.side // (1 if self.spec.unet_config else 2)) ** 2
        return (f"{self.row} ({type(self.patcher.model.model_config).__name__}): {params / 1e6:.0f} M parameters, "
                f"{self.px} px = {tokens} image tokens{'' if self.spec.unet_config else ' (2x2 patches)'} + "
                f"{self.tokens} text tokens, CFG {self.cfg:g}")


def build(row: str, blocks: int, px: int, dry_run: bool) -> FamilySetup:
    from support import tiny_families as tf
    if dry_run:
        spec = tf.TINY[ROWS[row][1]] if ROWS[row][1] else tf.TinyFamily(
            "sd15", {}, {}, 768, config_class="SD15", unet_config=dict(tf.TINY_SDXL_UNET, context_dim=768,
                                                                          adm_in_channels=None, num_classes=None,
                                                                          use_linear_in_transformer=False))
        tokens = 8
    else:
        spec, subject = real_width_spec(row, blocks)
        tokens = subject.context[0]
    dtype = torch.bfloat16 if common.device_kind() == "cuda" else torch.float32
    patcher, spec = tf.build_spec(spec, weight_dtype=dtype)
    return FamilySetup(row, spec, tokens, px, patcher)


def recipe_settings(setup: FamilySetup, variant: str, steps: int):
    """TrainSettings of the family's recipe (variant 'auto' = the recipe's, or 'lora') at setup.px."""
    from tlora_pack.trainer.settings import TrainSettings
    recipe = setup.family.recipe.resolve("auto" if variant == "tlora" else variant, 0, 0, steps)
    return TrainSettings(**recipe, resolution=setup.px, training_dtype=train_step.train_dtype(), storage="fp32")


def recipe_tlora(setup: FamilySetup):
    """A T-LoRA of the family's recipe on its attention targets, factors moved off their init."""
    from support.dense import moved_factors
    from tlora_pack.tlora_core.format import TLora
    from tlora_pack.trainer.train import find_target_layers, fused_record, new_factors
    settings = recipe_settings(setup, "tlora", 1).for_recipe(setup.family.recipe)
    model = setup.patcher.model
    sites = find_target_layers(model, settings.targets)
    config = settings.tlora_config(base_model=type(model.model_config).__name__, family=setup.family.name,
                                   source="benchmark", fused=fused_record(model, sites))
    return moved_factors(TLora(config, new_factors(sites, settings, config.ortho, torch.device("cpu"))))


def train_once(setup: FamilySetup, variant: str, steps: int, folder: str):
    """(wall gaps, CPU gaps) of `steps` train_tlora steps (the first gap, the warm-up, is None)."""
    from support.tiny_families import stub_vae
    from tlora_pack.trainer.train import train_tlora
    stamps = train_step.Stamps()
    image = train_step.synthetic_image(setup.px)
    train_tlora(setup.patcher, None, stub_vae(setup.patcher, setup.spec), image, None,
                recipe_settings(setup, variant, steps), folder, f"table/{setup.row}_{variant}", progress=stamps,
                conditioning=setup.conditioning(3))
    wall, cpu = stamps.gaps()
    return [None] + wall, [None] + cpu


def meta_subject(setup: FamilySetup):
    """memory_estimate's Subject for this very model: its latent, text and pooled widths as the setup feeds them."""
    spec = setup.spec
    return memory_estimate.Subject(
        setup.row, setup.row, setup.family.name, latent=(setup.patcher.model.latent_format.latent_channels,
                                                        spec.downscale),
        frames=spec.frames, context=(setup.tokens, spec.context), guidance="guidance" in spec.extra_cond,
        pooled=(spec.unet_config or {}).get("adm_in_channels") or spec.pooled,  # a UNet's y is its adm input
        unet=spec.unet_config or None)


def estimated_training(setup: FamilySetup) -> dict:
    """memory_estimate's meta-device count of one training step of this model at setup.px, in bytes: its
    weights in their dtype, the recipe's adapter with gradients and optimizer states, what autograd saves
    besides the weights (the base is not fp8 here, so a saved weight is the loaded one) and backward's working
    set."""
    model_config = setup.patcher.model.model_config
    with torch.device("meta"):
        model = model_config.get_model({}, "", device=torch.device("meta")).diffusion_model
    dtype = next(setup.patcher.model.diffusion_model.parameters()).dtype
    inputs = memory_estimate.step_inputs(meta_subject(setup), model, setup.px, dtype)
    saved = memory_estimate.traced_step(model, inputs, False, setup.family.inplace_residuals, setup.family.name)
    return {"weights": sum(p.numel() for p in model.parameters()) * dtype.itemsize,
            "adapter": memory_estimate.adapter_bytes(model, setup.family.name)[1],
            "saved": saved["activations"] + saved["working"]}


def measured_training(setup: FamilySetup, steps: int) -> dict:
    """The allocator's peak above its level before one T-LoRA training run of `steps` steps, in bytes
    (memory_counts.AllocatorPeak: CUDA's allocator, or glibc malloc on the CPU), and whether that level held the
    model's weights already (on the CPU they stay where they are; on CUDA the trainer loads them in the window)."""
    import comfy.model_management as mm
    mm.unload_all_models()
    device = common.device_kind()
    with tempfile.TemporaryDirectory() as folder:
        peak = memory_counts.AllocatorPeak(device).start()
        train_once(setup, "tlora", steps, folder)
        above = peak.stop()
    mm.unload_all_models()
    return {"peak": above["allocator"], "weights_before": device != "cuda"}


def measure(setup: FamilySetup, steps: int, train_steps: int, rounds: int) -> dict:
    """Interleaved rounds of the four rows on one model; {row: {"steps": [...], "cpu": [...]}}."""
    import comfy.model_management as mm
    from tlora_pack.trainer.runtime import apply_tlora
    patchers = {"bare": setup.patcher, "tlora": apply_tlora(setup.patcher, recipe_tlora(setup), 1.0)[0]}
    rows = ("bare", "tlora", "train_lora", "train_tlora")
    times = {r: {"steps": [], "cpu": []} for r in rows}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(rounds):
            for row in common.round_order(rows, r):
                if row.startswith("train_"):
                    wall, cpu = train_once(setup, row.removeprefix("train_"), train_steps, folder)
                else:
                    _, wall, cpu = common.sample_once(patchers[row], setup, setup.side, steps, common.device_kind())
                mm.unload_all_models()
                times[row]["steps"] += wall[1:]
                times[row]["cpu"] += cpu[1:]
    return times


def worker(args) -> dict:
    common.setup_pack()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_step.fast_ortho_init()
    native = 64 if args.dry_run else (512 if args.only == "sd15" else 1024)
    setup = build(args.only, args.blocks, args.px or native, args.dry_run)
    start = time.perf_counter()
    times = measure(setup, args.steps, args.train_steps, args.rounds)
    memory = {"estimated": estimated_training(setup), **measured_training(setup, args.train_steps)}
    return {"row": args.only, "model": setup.describe(), "times": times, "memory": memory,
            "seconds": time.perf_counter() - start,
            "family": setup.family.name,
            "recipe": dataclasses.asdict(recipe_settings(setup, "tlora", 1).for_recipe(setup.family.recipe))}


def memory_pair(memory: dict) -> tuple[int, int]:
    """(measured peak, the estimate on the same basis) in bytes: without the weights where they were resident
    before the run (the CPU), with them where the trainer loaded them inside it (CUDA)."""
    est = memory["estimated"]
    return memory["peak"], est["adapter"] + est["saved"] + (0 if memory["weights_before"] else est["weights"])


def table(results: list) -> list[str]:
    lines = ["| family | model as run | sampling s/step bare / T-LoRA (CPU) | **T-LoRA / bare** (wall / CPU) | "
             "training s/step LoRA / T-LoRA (CPU) | **T-LoRA / LoRA** (wall / CPU) | "
             "T-LoRA training peak MiB, measured / estimated (ratio) | recipe |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        wall, cpu = common.step_medians(res["times"])
        r = res["recipe"]
        measured, estimated = memory_pair(res["memory"])
        lines.append(
            f"| {res['family']} | {res['model']} | {cpu['bare']:.2f} / {cpu['tlora']:.2f} | "
            f"{wall['tlora'] / wall['bare']:.2f}x / {cpu['tlora'] / cpu['bare']:.2f}x | "
            f"{cpu['train_lora']:.2f} / {cpu['train_tlora']:.2f} | "
            f"{wall['train_tlora'] / wall['train_lora']:.2f}x / {cpu['train_tlora'] / cpu['train_lora']:.2f}x | "
            f"{measured / MIB:.0f} / {estimated / MIB:.0f} ({measured / estimated:.2f}x) | "
            f"{r['variant']} r {r['rank']}, r_min {r['min_rank']}, {r['optimizer']}, {r['targets']} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    parser.add_argument("--blocks", type=int, default=1, help="blocks of each kind (UNets: transformer layers "
                                                                 "per attention block, one res block per level)")
    parser.add_argument("--px", type=int, default=0, help="image size (0: 512 for SD1.5, 1024 for the others)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per run (the first is not timed)")
    parser.add_argument("--train-steps", type=int, default=3, help="training steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the four rows")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dry-run", action="store_true", help="tiny widths at 64 px, 1 round of 2 steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        args.steps, args.train_steps, args.rounds = 2, 2, 1
    if args.worker:
        print(common.RESULT_TAG + json.dumps(worker(args)), flush=True)
        return
    unknown = [r for r in args.only.split(",") if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: use {', '.join(ROWS)}")
    common.setup_pack()
    print(common.environment(), flush=True)
    results = []
    for row in args.only.split(","):
        print(f"-- {row}", flush=True)
        flags = ["--only", row, "--blocks", str(args.blocks), "--px", str(args.px), "--steps", str(args.steps),
                 "--train-steps", str(args.train_steps), "--rounds", str(args.rounds), "--threads", str(args.threads)]
        if args.dry_run:  # all in this process: the children's start-up would be most of a dry run
            results.append(worker(argparse.Namespace(**{**vars(args), "only": row})))
        else:
            results.append(common.run_child(["--worker", *flags], script=Path(__file__)))
        print(f"   {results[-1]['model']}: {results[-1]['seconds']:.0f} s", flush=True)
        print("   " + table(results[-1:])[-1], flush=True)  # each row as it comes: a cut-short run keeps it
    print("\n" + "\n".join(table(results)))
    print(f"\nload average at end: {common.load_average()}")


if __name__ == "__main__":
    main()
