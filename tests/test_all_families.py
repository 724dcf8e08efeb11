"""Every generative class of the host's comfy.supported_models that can be built tiny: two training steps with
the family's recipe (what the Train node resolves), Apply = a hand-built dense W + dW(t) at three sigmas with
r(t) from the paper's t, and the exact export read by ComfyUI's stock LoRA loader.

The classes come from the host (0.3.75 has fewer); support.tiny_classes builds each with the host's own
detector and the class's own unet_config. NOT_TINY names every other class of ComfyUI 0.33.0's
supported_models, with the reason it is not built here (the README counts them).
"""
import logging

import pytest
import torch

from support import tiny_classes as tc
from support import tiny_families as tf
from support.dense import dense_delta, moved_factors, paper_rank
from support.predict import predict_x0

pytestmark = pytest.mark.usefixtures("comfy")

RANK, MIN_RANK = 4, 1

_GEN_VIDEO = "a generator whose tiny build needs its own conditioning inputs (not done yet)"
NOT_TINY = {
    "Stable_Zero123": "builds its cc_projection from checkpoint weights (get_model reads them from the state dict)",
    **{name: "a video UNet at full width (model_channels 320 is a detection key)" for name in
       ("SVD_img2vid", "SV3D_u", "SV3D_p")},
    "HunyuanImage21Refiner": "HunyuanImage 2.1's refiner (3-D patches of 64 channels); HunyuanImage21 covers it",
    "WAN22_S2V": "the generic rule also adapts its audio injector's attention (48 of the tiny build's 56 adapters), "
                 "which only audio_embed reaches; giving it audio features is not done yet (the Wan rows cover the blocks)",
    "WAN22_WanDancer": "the generic rule also adapts its music encoder's and injector's attention (46 of the tiny "
                       "build's 56 adapters), which only music features reach; giving them is not done yet",
    "Anima": "Cosmos Predict2's network with an LLM adapter: on 0.33.0 its self-attention calls comfy_kitchen's "
             "rms_rope_split_half, which has no backward, even in training (CosmosT2IPredict2's test shows it)",
    "MiniMaxH3": "an audio-video model whose attention calls comfy_kitchen's rms_rope_split_half, which has no "
                 "backward, in training too (comfy/ldm/minimax/model.py)",
    "Ideogram4": "its config class sets the full widths in unet_extra_config over any detected config (18 heads of "
                 "256, MLP 12288, LLM features 53248): one layer alone is about half a billion parameters",
    **{name: _GEN_VIDEO for name in
       ("HiDreamO1", "LTXAV", "PixelDiTT2I", "PiD", "SeedVR2")},
    # not image or video generators
    **{name: "audio model" for name in ("StableAudio", "StableAudio3", "ACEStep", "ACEStep15", "MiniMaxMusic3")},
    **{name: "3-D model" for name in ("Hunyuan3Dv2", "Hunyuan3Dv2_1", "Hunyuan3Dv2mini", "TripoSplat", "Trellis2")},
    **{name: "not a diffusion generator (detection, segmentation, depth)" for name in
       ("RT_DETR_v4", "SAM3", "SAM31", "DepthAnything3")},
}


def test_every_class_of_the_host_is_covered_or_listed(comfy):
    """Nothing of the host's supported_models is silently left out."""
    import comfy.supported_models

    names = [cls.__name__ for cls in comfy.supported_models.models]
    missing = [n for n in names if n not in tc.CLASSES and n not in NOT_TINY]
    assert not missing, f"classes neither built tiny nor listed with a reason: {missing}"
    assert not set(tc.CLASSES) & set(NOT_TINY)


def _sigma_and_t(patcher, fraction):
    """A sigma at `fraction` of the noise range and the paper's t there, by hand: 1000·sigma for the flow
    samplings, 1000 times the time Stable Cascade's sampling feeds its model and Cosmos's rectified-flow time sigma / (sigma + 1), for EDM (Cosmos 1) the sigma of
    ComfyUI's standard SD table at t, and a discrete sampling's own sigma table entry and its index otherwise
    (Wan FlowRVS predicts flow on the discrete SD table)."""
    import comfy.model_sampling as ms

    sampling = patcher.model.model_sampling
    if isinstance(sampling, (ms.ModelSamplingDiscreteFlow, ms.ModelSamplingFlux)):
        return fraction, 1000 * fraction
    if isinstance(sampling, ms.StableCascadeSampling):  # the time in [0, 1] it feeds the model (unshifted)
        sigma = sampling.sigma(torch.tensor(fraction))
        return float(sigma), 1000 * float(sampling.timestep(sigma))
    if isinstance(sampling, ms.ModelSamplingCosmosRFlow):  # Cosmos Predict2: its flow time is sigma / (sigma + 1)
        return fraction / (1 - fraction), 1000 * fraction
    if isinstance(sampling, ms.ModelSamplingContinuousEDM):  # no timesteps: SD's own table, at the same sigma
        t = int(999 * fraction)
        return float(ms.ModelSamplingDiscrete().sigmas[t]), t
    assert isinstance(sampling, ms.ModelSamplingDiscrete), type(sampling).__mro__
    t = int(999 * fraction)
    return float(sampling.sigmas[t]), t


def _train_two_steps(name, folder):
    """(patcher, spec, TrainResult) of class `name` built tiny and trained 2 steps with its family's recipe."""
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import model_family, train_tlora

    patcher, spec = tf.build_spec(tc.spec_for(name))
    assert type(patcher.model.model_config).__name__ == name
    recipe = model_family(patcher.model).recipe.resolve("auto", RANK, MIN_RANK, 2)
    size = tc.size_for(name)
    settings = TrainSettings(**recipe, resolution=size, storage="fp32")  # the family's optimiser at its own rate
    result = train_tlora(patcher, None, tf.stub_vae(patcher, spec), torch.rand(1, size, size, 3), None, settings,
                         str(folder), f"all/{name}", conditioning=tf.conditioning(spec))
    return patcher, spec, result


@pytest.fixture(scope="module", params=tc.host_classes())
def trained(request, tmp_path_factory):
    """(class name, patcher, spec, TrainResult) after 2 steps with the family's recipe, saved in fp32."""
    name = request.param
    return (name, *_train_two_steps(name, tmp_path_factory.mktemp(name)))


@pytest.mark.parametrize("name", tc.host_classes_without_backward())
def test_a_class_whose_kernel_has_no_backward_on_this_host_fails_to_train_for_that_reason(name, tmp_path):
    """Where the host's network calls a kernel without a backward (0.33.0's Cosmos Predict2, ERNIE-Image and JoyImage
    call comfy_kitchen's RMS-norm + RoPE or RoPE even in training), training stops at that kernel; once it has a
    backward, this fails and the class belongs with the others."""
    kernel = tc.kernel_without_backward(name)
    with pytest.raises(RuntimeError, match=f"backward through comfy_kitchen.{kernel}.*no autograd formula"):
        _train_two_steps(name, tmp_path)


# classes whose blocks sit in nested containers: Cosmos 1 a ModuleDict of blocks, Stable Cascade a list per level
NESTED_BLOCKS = {"CosmosT2V": lambda m: list(m.blocks.values()),
                 "Stable_Cascade_C": lambda m: [b for level in (*m.down_blocks, *m.up_blocks) for b in level]}


@pytest.mark.parametrize("name", [n for n in NESTED_BLOCKS if n in tc.host_classes()])
def test_checkpointing_reaches_blocks_in_nested_containers_and_keeps_the_gradients(name, tmp_path, monkeypatch):
    """Gradient checkpointing wraps every block of a dict or of a list of lists (a container itself is never
    called), and the checkpointed steps' gradients are those of plain backprop."""
    from support.grads import AdamWGradients, assert_same_gradients
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import checkpoint_units, model_family, train_tlora

    log, grads = AdamWGradients(monkeypatch), {}
    for checkpointing in (False, True):
        grads[checkpointing] = log.run()
        patcher, spec = tf.build_spec(tc.spec_for(name))
        family = model_family(patcher.model)
        assert family.recipe.optimizer == "adamw"  # the recorder patches AdamW
        recipe = family.recipe.resolve("auto", RANK, MIN_RANK, 2)
        size = tc.size_for(name)
        settings = TrainSettings(**recipe, resolution=size, storage="fp32", gradient_checkpointing=checkpointing)
        train_tlora(patcher, None, tf.stub_vae(patcher, spec), torch.rand(1, size, size, 3), None, settings,
                    str(tmp_path / str(checkpointing)), f"gc/{name}", conditioning=tf.conditioning(spec))
    assert_same_gradients(grads[False], grads[True])
    model = patcher.model.diffusion_model
    units = {id(u) for u in checkpoint_units(model)}
    assert all(id(block) in units for block in NESTED_BLOCKS[name](model)), f"{name}: blocks left out of checkpointing"


@pytest.fixture(scope="module")
def reference(trained):
    """A second copy of the class's tiny model (same seed) and its own weights as built."""
    patcher, _ = tf.build_spec(tc.spec_for(trained[0]))
    return patcher, {k: v.clone() for k, v in patcher.model.state_dict().items()}


def _with_delta(reference, tlora, keep):
    """The reference model with weights W + dW(keep) set by hand, fused projections in the rows the file
    records."""
    patcher, weights = reference
    with torch.no_grad():
        patcher.model.load_state_dict(weights)
        for key, f in tlora.layers.items():
            if key in tlora.config.fused:
                module, offset, size, _ = tlora.config.fused[key]
                patcher.model.get_submodule(module).weight[offset:offset + size] += dense_delta(f, keep)
            else:
                patcher.model.get_submodule(key).weight += dense_delta(f, keep)
    return patcher


def test_two_steps_train_every_adapter_of_the_family(trained):
    from tlora_pack.trainer.train import find_target_layers, model_family

    name, patcher, _, result = trained
    family = model_family(patcher.model)
    cfg = result.tlora.config
    assert cfg.family == family.name and cfg.variant == family.recipe.variant
    assert len(result.losses) == 2 and result.saved[-1].is_file()
    assert set(result.tlora.layers) == set(find_target_layers(patcher.model, "attention"))
    moved = [k for k, f in result.tlora.layers.items()
             if not (torch.equal(f.up, f.base_up) if f.has_base else torch.count_nonzero(f.up) == 0)]
    assert len(moved) > len(result.tlora.layers) // 2, f"{name}: most adapters must receive a gradient"


@pytest.mark.parametrize("fraction", [0.97, 0.5, 0.1])
def test_apply_equals_dense_weights_with_the_paper_t(trained, reference, fraction):
    from tlora_pack.trainer.runtime import apply_tlora

    name, patcher, spec, result = trained
    tlora = moved_factors(result.tlora)
    applied, runtime = apply_tlora(patcher, tlora, 1.0)
    cond = tf.conditioning(spec)
    size = tc.size_for(name)
    x = torch.randn(tf.latent_shape(patcher, spec, 1, size), generator=torch.Generator().manual_seed(3))
    sigma, t = _sigma_and_t(patcher, fraction)
    got = predict_x0(applied, cond, x, [sigma])
    keep = paper_rank(t, RANK, MIN_RANK)
    assert runtime.last.ranks == [keep], (runtime.last.ranks, keep)
    want = predict_x0(_with_delta(reference, tlora, keep), cond, x, [sigma])
    effect = (want - predict_x0(patcher, cond, x, [sigma])).norm()
    assert effect > 1e-5 * want.norm(), f"{name}: the T-LoRA changes the output"
    assert (got - want).norm() < 1e-3 * effect, name


def test_export_loads_in_comfyuis_stock_lora_loader(trained, caplog):
    import comfy.sd

    from tlora_pack.tlora_core.export import export_standard_lora
    from tlora_pack.trainer.runtime import apply_tlora

    name, patcher, spec, result = trained
    tlora = moved_factors(result.tlora)
    sigma, t = _sigma_and_t(patcher, 0.3)
    lora, report = export_standard_lora(tlora, timestep=t, storage="fp32")
    with caplog.at_level(logging.WARNING):
        loaded, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert "not loaded" not in caplog.text, name
    cond = tf.conditioning(spec)
    x = torch.randn(tf.latent_shape(patcher, spec, 1, tc.size_for(name)), generator=torch.Generator().manual_seed(4))
    want = predict_x0(apply_tlora(patcher, tlora, 1.0)[0], cond, x, [sigma])
    got = predict_x0(loaded, cond, x, [sigma])
    assert (got - want).norm() / want.norm() < 1e-5, name


@pytest.mark.parametrize("name", ["sdxl", "flux_dev", "sd35", "lumina2", "qwen_image"])
def test_the_generic_rule_finds_every_site_of_the_hand_written_rules(name):
    """On the families with hand-written rules, the generic rule finds the same sites with the same rows
    (and more: the text stream's output projections, which those rules leave to "attention+feedforward")."""
    from tlora_pack.tlora_core.families import generic_sites
    from tlora_pack.trainer.train import find_target_layers

    patcher, _ = tf.build(name)
    explicit = find_target_layers(patcher.model, "attention")
    generic = generic_sites(patcher.model.diffusion_model)
    assert all(generic.get(key) == site for key, site in explicit.items()), name
    extra = set(generic) - set(explicit)
    assert all(key.endswith(("proj", "to_add_out")) for key in extra), sorted(extra)


def _as_class(patcher, class_name):
    """The patcher's model presented as a config class the family table does not list."""
    import comfy.supported_models_base

    unknown = type(class_name, (comfy.supported_models_base.BASE,), {})
    patcher.model.model_config.__class__ = unknown
    return patcher


def test_a_model_of_an_unknown_class_trains_with_the_generic_rule_and_logs_its_layers(caplog):
    from tlora_pack.trainer.train import find_target_layers, model_family

    patcher = _as_class(tf.build("qwen_image")[0], "SomeNewDiT")
    family = model_family(patcher.model)
    assert family.name == "SomeNewDiT" and family.recipe.variant == "vanilla_tlora"  # a flow model: FLUX recipe
    with caplog.at_level(logging.WARNING):
        sites = find_target_layers(patcher.model, "attention")
    assert "SomeNewDiT is not in the family table" in caplog.text
    assert all(key in caplog.text for key in sites) and len(sites) == 8


def test_a_model_without_attention_projections_is_refused_by_name():
    from tlora_pack.tlora_core.errors import TLoraError
    from tlora_pack.trainer.train import find_target_layers

    patcher = _as_class(tf.build("qwen_image")[0], "NoAttentionNet")
    patcher.model.diffusion_model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    with pytest.raises(TLoraError, match="no attention projections.*NoAttentionNet"):
        find_target_layers(patcher.model, "attention")


def test_a_slice_across_comfyuis_own_q_k_v_rows_is_refused():
    """ComfyUI's key map names the q, k, v rows of Flux's fused qkv (its diffusers entries): a layout that
    put an adapter across the q / k border would be caught before training."""
    import dataclasses

    from tlora_pack.tlora_core.errors import TLoraError
    from tlora_pack.trainer.train import check_against_key_map, find_target_layers

    patcher, _ = tf.build("flux_dev")
    sites = find_target_layers(patcher.model, "attention")
    key = "diffusion_model.double_blocks.0.img_attn.qkv.q"
    width = sites[key].rows[1]
    check_against_key_map(patcher.model, {key: sites[key]})
    wrong = dataclasses.replace(sites[key], rows=(width // 2, width))
    with pytest.raises(TLoraError, match="cut across ComfyUI's projection"):
        check_against_key_map(patcher.model, {key: wrong})
