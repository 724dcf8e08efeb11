"""The Train node's `memory` input: the family table's presets, how one is picked and applied, and the
CPU path of 'auto' (no change, logged) through a real server."""
import json
import logging

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.usefixtures("comfy")
GPU = torch.device("cuda", 0)  # only a name here: nothing runs on it


def _family(name):
    from tlora_pack.tlora_core.families import family_named
    return family_named(name)


def _plan(choice, family="Flux", checkpointing=False, resolution=0, dtype=torch.bfloat16, device=GPU, available=None):
    from tlora_pack.trainer.memory import plan_memory
    return plan_memory(choice, _family(family), checkpointing, resolution, dtype, device, available)


# Families benchmarks/memory_estimate.py cannot count yet, so they have no presets ('memory' then logs "no presets
# for the X family yet; settings unchanged"):
NOT_ESTIMATED = {
    # its MoE feed-forward routes each token to the experts its gate picks, by boolean indexing on the gate's
    # values, which the meta device cannot trace; counting every token at every expert would over-count 4x
    "HiDream",
}


def test_every_family_has_a_preset_for_every_card():
    import comfy.supported_models

    from tlora_pack.tlora_core.families import FAMILIES, MEMORY_CARDS, MEMORY_PRESETS
    families = {f.name for f in FAMILIES}
    # exactly the named families lack presets: a new family without a row, or a row for a named one, fails here
    assert families - set(MEMORY_PRESETS) == NOT_ESTIMATED
    # the other keys are config classes of the host (models of their own size within a family)
    assert all(isinstance(getattr(comfy.supported_models, k, None), type) for k in set(MEMORY_PRESETS) - families)
    for name, table in MEMORY_PRESETS.items():
        assert tuple(table.cards) == MEMORY_CARDS, name
        # a larger card never needs more saving than a smaller one
        for small, large in zip(MEMORY_CARDS, MEMORY_CARDS[1:]):
            a, b = table.cards[small], table.cards[large]
            assert (b.gradient_checkpointing <= a.gradient_checkpointing and b.fp8_base <= a.fp8_base
                    and (b.max_resolution == 0 or 0 < a.max_resolution <= b.max_resolution) and b.fits >= a.fits), name


def test_the_issues_goals_are_met_by_the_estimate():
    """FLUX.1-dev, Flux.2 Klein and Wan 2.2 5B fit 16 GB, SD-XL fits 8 GB (benchmarks/memory_estimate.py):
    all at their recipe's size but FLUX.1-dev, at 768 px (14.3 GiB with an fp8 base and checkpointing; 15.4 at
    1024 px is over the 15 the estimate leaves of a 16 GB card)."""
    from tlora_pack.tlora_core.families import memory_table
    for key, card, px in (("Flux", 16, 768), ("Flux2", 16, 0), ("WAN22_T2V", 16, 0), ("SD-XL", 8, 0)):
        preset = memory_table(key).cards[card]
        assert preset.fits, key
        assert preset.max_resolution == px, key
    # a config class's own presets come before its family's
    assert memory_table("Lumina2", ("ZImage", "Lumina2")) is not memory_table("Lumina2")


def test_auto_on_the_cpu_changes_nothing_and_says_so(caplog):
    with caplog.at_level(logging.INFO):
        plan = _plan("auto", checkpointing=False, resolution=320, device=torch.device("cpu"))
    assert (plan.gradient_checkpointing, plan.resolution) == (False, 320)
    assert "training on the CPU" in plan.note and plan.note in caplog.text


def test_off_changes_nothing():
    plan = _plan("off", checkpointing=False, resolution=0, available=2.0)
    assert (plan.gradient_checkpointing, plan.resolution, plan.note) == (False, 0, "")


def test_a_card_preset_turns_checkpointing_on_and_says_when_it_assumes_fp8():
    from tlora_pack.tlora_core.families import memory_table
    preset = memory_table("Flux").cards[16]
    plan = _plan("16 GB", dtype=torch.bfloat16)
    assert plan.gradient_checkpointing == preset.gradient_checkpointing
    assert ("fp8_e4m3fn" in plan.note) == preset.fp8_base
    assert "fp8_e4m3fn" not in _plan("16 GB", dtype=torch.float8_e4m3fn).note  # already fp8: nothing to say
    assert _plan("16 GB", checkpointing=True).gradient_checkpointing  # a preset never turns it off


@pytest.mark.parametrize("family", ["SD1.x", "SD-XL", "Flux", "SD3", "Lumina2", "QwenImage", "HunyuanVideo",
                                    "LongCat-Image", "PixArt", "CogVideoX", "StableCascade"])
@pytest.mark.parametrize("card", [8, 12, 16, 24])
def test_a_preset_caps_the_resolution_and_never_raises_it(family, card):
    from tlora_pack.tlora_core.families import memory_table
    preset = memory_table(family).cards[card]
    native = _family(family).recipe.resolution
    plan = _plan(f"{card} GB", family)
    assert plan.resolution == (preset.max_resolution if 0 < preset.max_resolution < native else 0)
    assert _plan(f"{card} GB", family, resolution=256).resolution == 256  # lower than any cap: kept


def test_auto_on_a_gpu_picks_the_largest_card_the_free_memory_holds():
    from tlora_pack.tlora_core.families import memory_table
    from tlora_pack.trainer.memory import card_for
    as_loaded = memory_table("Flux").as_loaded_gib
    assert as_loaded > 24
    free = (3.0, 7.6, 11.0, 12.0, 20.0, 23.6, as_loaded - 1.0)  # the last: above 24, short of as loaded
    assert [card_for("auto", gib, as_loaded) for gib in free] == [8, 8, 8, 12, 16, 24, 24]
    assert card_for("auto", as_loaded + 1.0, as_loaded) is None  # room for the run as loaded: no preset
    assert card_for("12 GB", 100.0, as_loaded) == 12  # a named card is taken as it is
    plan = _plan("auto", available=15.8)
    assert "16 GB preset" in plan.note and "15.8 GiB available" in plan.note
    roomy = _plan("auto", available=as_loaded + 2, resolution=512)
    assert (roomy.gradient_checkpointing, roomy.resolution) == (False, 512) and "settings unchanged" in roomy.note


def test_a_bad_memory_choice_is_refused_by_name():
    from tlora_pack.tlora_core.errors import TLoraConfigError
    with pytest.raises(TLoraConfigError, match="memory '10 GB' is not a preset; choose one of off, auto, 8 GB"):
        _plan("10 GB")


def test_memory_is_the_last_input_optional_and_off_by_default(comfy_server):
    spec = comfy_server.object_info()["TLoraTrainFromImage"]["input"]
    optional = spec["optional"]
    assert list(optional)[-1] == "memory"
    assert optional["memory"][1]["default"] == "off" and optional["memory"][1]["tooltip"]


def test_auto_through_the_server_on_the_cpu_trains_as_set_and_logs_it(comfy_server):
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "tlora_sample.png"}},
        "3": {"class_type": "TLoraTrainFromImage", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "trigger": "sks",
            "class_word": "dog", "prompt_template": "a photo of {trigger} {class}", "variant": "tlora",
            "rank": 4, "min_rank": 2, "steps": 1, "learning_rate": 1e-3, "seed": 0,
            "filename_prefix": "tlora/memory_auto", "resolution": 64, "memory": "auto"}},
    }
    before = comfy_server.log_text().count("memory auto: training on the CPU")
    entry = comfy_server.run(wf, timeout=300)
    name = entry["outputs"]["3"]["text"][0]
    with safe_open(str(comfy_server.base_dir / "models" / "loras" / name), "pt") as f:
        training = json.loads(f.metadata()["tlora.config"])["training"]
    assert (training["gradient_checkpointing"], training["resolution"]) == (False, 64)
    assert comfy_server.log_text().count("memory auto: training on the CPU") == before + 1
