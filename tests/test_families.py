"""Every family (SD-XL and the DiTs): train, Apply = a hand-built dense W + dW(t) per slice with r(t) from
the paper's t (1000·sigma for flow models), save -> load -> export -> ComfyUI's stock LoRA loader, fp8 bases.

The tiny models are built by ComfyUI itself (support.tiny_families); the reference model is a second
copy with the same seed whose weights get dW added by hand, row by row for fused projections.
"""
import logging

import pytest
import torch

from support.dense import dense_delta, moved_factors, paper_rank
from support import tiny_families as tf
from support.predict import predict_x0

pytestmark = pytest.mark.usefixtures("comfy")

RANK, MIN_RANK = 4, 1


def _paper_rank(t, rank=RANK, min_rank=MIN_RANK):
    return paper_rank(t, rank, min_rank)
# adapters per tiny model, counted by hand from the blocks each builds:
# Flux double block: img q, k, v, proj + txt q, k, v = 7; single block: q, k, v of linear1 = 3.
# SD3.5 joint block: x q, k, v, proj + context q, k, v = 7, block 0 adds attn2 q, k, v, proj = 4.
# Lumina 2 / Z-Image: q, k, v, out in each of layers.0, noise_refiner.0, context_refiner.0.
# Qwen-Image block: to_q, to_k, to_v, to_out.0, add_q/k/v_proj = 7.
# SD-XL (tiny, one level): one transformer block in the input, middle and each of 2 output blocks, 8 each.
EXPECTED = {"sdxl": ("SD-XL", 4 * 8), "flux_dev": ("Flux", 7 + 2 * 3), "flux_schnell": ("Flux", 7 + 3), "sd35": ("SD3", 2 * 7 + 4),
            "lumina2": ("Lumina2", 3 * 4), "zimage": ("Lumina2", 3 * 4), "qwen_image": ("QwenImage", 7)}


def _sigma_and_t(spec, patcher, fraction):
    """A sigma at `fraction` of the noise range and the paper's t there: flow models t = 1000·sigma;
    discrete ones (SD-XL) a sigma of their own table, t its index."""
    if spec.name == "sdxl":
        t = int(999 * fraction)
        return float(patcher.model.model_sampling.sigmas[t]), t
    return fraction, 1000 * fraction


@pytest.fixture(scope="module", params=list(tf.TINY))
def trained(request, tmp_path_factory):
    """(name, patcher, spec, TrainResult) after 2 steps through train_tlora with the family's recipe and
    a preview (2 Euler steps, the family's CFG) after step 2; saved in fp32."""
    from tlora_pack.trainer.preview import PreviewSettings
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import model_family, train_tlora

    name = request.param
    patcher, spec = tf.build(name)
    family = model_family(patcher.model)
    recipe = family.recipe.resolve("auto", RANK, MIN_RANK, 2)
    settings = TrainSettings(**recipe, resolution=64, storage="fp32")  # the family's optimiser at its own rate
    look = PreviewSettings(every=2, steps=2, cfg=family.recipe.preview.cfg, guidance=family.recipe.preview.guidance)
    result = train_tlora(patcher, None, tf.stub_vae(patcher, spec), torch.rand(1, 80, 64, 3), None, settings,
                         str(tmp_path_factory.mktemp(name)), f"fam/{name}", conditioning=tf.conditioning(spec),
                         previews=look)
    return name, patcher, spec, result


def _reference(name, tlora, keep, source=None):
    """A second copy of the tiny model in fp32 whose weights are W + dW, set by hand: fused projections
    get their dW in their own rows, found by the model's shapes, not by the pack. W is the same seed's
    model, or the values `source` (an fp8 model) really multiplies by: its fp8 weights times their
    scale_weight where a layer has one."""
    patcher, _ = tf.build(name)
    if source is not None:
        held = source.model.state_dict()
        with torch.no_grad():
            for k, p in patcher.model.state_dict().items():
                scale = held.get(k[:-len("weight")] + "scale_weight") if k.endswith(".weight") else None
                p.copy_(held[k].float() * (1 if scale is None else scale.float()))
    fused = tlora.config.fused
    with torch.no_grad():
        for key, f in tlora.layers.items():
            dw = dense_delta(f, keep)
            if key in fused:
                module, offset, size, _ = fused[key]
                patcher.model.get_submodule(module).weight[offset:offset + size] += dw
            else:
                patcher.model.get_submodule(key).weight += dw
    return patcher


def test_training_adapts_each_projection_with_its_own_adapter(trained):
    from tlora_pack.trainer.train import find_target_layers

    name, patcher, _, result = trained
    family, count = EXPECTED[name]
    cfg = result.tlora.config
    assert cfg.family == family and len(result.tlora.layers) == count == len(find_target_layers(patcher.model,
                                                                                                "attention"))
    recipe_variant = "tlora" if family == "SD-XL" else "vanilla_tlora"  # the paper's SD-XL / the reference FLUX
    assert cfg.variant == recipe_variant and (cfg.rank, cfg.min_rank) == (RANK, MIN_RANK)
    assert result.saved[-1].is_file() and len(result.losses) == 2
    for key, (module, offset, size, rows) in cfg.fused.items():
        weight = patcher.model.get_submodule(module).weight
        assert weight.shape[0] == rows and result.tlora.layers[key].up.shape[0] == size
        assert key.rsplit(".", 1)[1] in ("q", "k", "v") and offset + size <= rows
    # The text-stream queries of the final joint block only shape text outputs the model then drops
    # (SD3's pre-only last context block, Qwen-Image's last block): no gradient reaches them.
    dead = {"sd35": ["diffusion_model.joint_blocks.1.context_block.attn.qkv.q"],
            "qwen_image": ["diffusion_model.transformer_blocks.0.attn.add_q_proj"]}.get(name, [])
    still = [k for k, f in result.tlora.layers.items()
             if (torch.equal(f.up, f.base_up) if f.has_base else torch.count_nonzero(f.up) == 0)]
    assert still == dead, f"adapters that received no gradient: {still}"


@pytest.mark.parametrize("trained", ["lumina2"], indirect=True)
def test_grouped_query_qkv_splits_q_k_v_by_heads(trained):
    """Lumina 2's qkv holds 4 query heads and 2 key/value heads of width 24: q 96 rows, k and v 48."""
    _, _, _, result = trained
    fused = result.tlora.config.fused
    assert fused["diffusion_model.layers.0.attention.qkv.q"][1:] == [0, 96, 192]
    assert fused["diffusion_model.layers.0.attention.qkv.k"][1:] == [96, 48, 192]
    assert fused["diffusion_model.layers.0.attention.qkv.v"][1:] == [144, 48, 192]


@pytest.fixture(params=["weight", "activations"])
def path(request, monkeypatch):
    """Force where sampling adds dW (tiny models have so few tokens that the FLOP rule would always
    pick the activations): on the weight through ComfyUI's weight functions, or on the output."""
    from tlora_pack.trainer import runtime
    monkeypatch.setattr(runtime, "activations_cheaper", lambda *a: request.param == "activations")
    return request.param


@pytest.mark.parametrize("fraction", [0.97, 0.5, 0.1])
def test_apply_equals_dense_weights_with_the_paper_t(trained, fraction, path):
    from tlora_pack.trainer.runtime import apply_tlora

    name, patcher, spec, result = trained
    tlora = moved_factors(result.tlora)
    applied, runtime = apply_tlora(patcher, tlora, 1.0)
    cond = tf.conditioning(spec)
    x = torch.randn(tf.latent_shape(patcher, spec, 1, 64), generator=torch.Generator().manual_seed(3))
    sigma, t = _sigma_and_t(spec, patcher, fraction)
    got = predict_x0(applied, cond, x, [sigma])
    keep = _paper_rank(t)
    assert runtime.last.ranks == [keep], (runtime.last.ranks, keep)
    want = predict_x0(_reference(name, tlora, keep), cond, x, [sigma])
    effect = (want - predict_x0(patcher, cond, x, [sigma])).norm()
    assert effect > 1e-5 * want.norm(), "the T-LoRA changes the output"
    assert (got - want).norm() < 1e-3 * effect


def test_export_loads_in_comfyuis_stock_lora_loader(trained, caplog):
    """The exact export at the paper's t of a sigma equals the T-LoRA at that sigma, read by comfy.sd's loader;
    fused projections are written as one LoRA on the whole fused weight."""
    import comfy.sd

    from tlora_pack.tlora_core.export import export_standard_lora
    from tlora_pack.trainer.runtime import apply_tlora

    name, patcher, spec, result = trained
    tlora = moved_factors(result.tlora)
    sigma, t = _sigma_and_t(spec, patcher, 0.3)
    lora, report = export_standard_lora(tlora, timestep=t, storage="fp32")
    assert report.kept == _paper_rank(t)
    with caplog.at_level(logging.WARNING):
        loaded, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert "not loaded" not in caplog.text
    cond = tf.conditioning(spec)
    x = torch.randn(tf.latent_shape(patcher, spec, 1, 64), generator=torch.Generator().manual_seed(4))
    want = predict_x0(apply_tlora(patcher, tlora, 1.0)[0], cond, x, [sigma])
    got = predict_x0(loaded, cond, x, [sigma])
    assert (got - want).norm() / want.norm() < 1e-5


def test_the_preview_is_what_ksampler_makes_with_the_saved_file(trained):
    """Without a CLIP the preview samples the training conditioning, against a zeroed negative at the
    family's CFG: the image equals KSampler (euler, simple, same seed) on the file through Apply."""
    import comfy.sample
    from tlora_pack.trainer.preview import zeroed
    from tlora_pack.trainer.runtime import apply_tlora
    from tlora_pack.trainer.train import model_family

    name, patcher, spec, result = trained
    cfg = model_family(patcher.model).recipe.preview.cfg
    positive = tf.conditioning(spec)
    patched, _ = apply_tlora(patcher, result.tlora, 1.0)
    empty = torch.zeros(tf.latent_shape(patcher, spec, 1, 64))
    latent = comfy.sample.sample(patched, comfy.sample.prepare_noise(empty, 0), 2, cfg, "euler", "simple", positive,
                                 zeroed(positive), empty, seed=0, disable_pbar=True)
    expected = tf.stub_vae(patcher, spec).decode(latent).reshape(-1, 64, 64, 3)
    assert result.previews is not None and tuple(result.previews.shape) == (1, 64, 64, 3), name
    assert torch.allclose(result.previews, expected, atol=1e-4), (name, (result.previews - expected).abs().max())
    bare = comfy.sample.sample(patcher, comfy.sample.prepare_noise(empty, 0), 2, cfg, "euler", "simple", positive,
                               zeroed(positive), empty, seed=0, disable_pbar=True)
    assert not torch.allclose(latent, bare, atol=1e-6), f"{name}: the T-LoRA must change the preview"


@pytest.mark.parametrize("trained", ["flux_dev"], indirect=True)
def test_a_flux_tlora_is_refused_on_another_family(trained):
    from tlora_pack.tlora_core.errors import TLoraError
    from tlora_pack.trainer.runtime import apply_tlora

    _, _, _, result = trained
    other, _ = tf.build("sd35")
    with pytest.raises(TLoraError, match="made for Flux.*SD3"):
        apply_tlora(other, result.tlora)


FP8 = getattr(torch, "float8_e4m3fn", None)


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
def test_fp8_base_applies_exactly_and_stays_fp8(tmp_path, path):
    """A Flux stored in fp8 (computed in fp32 on the CPU): Apply equals the dense reference built from
    the fp8 values, and the base weights are still fp8 afterwards; training runs on it."""
    from tlora_pack.trainer.runtime import apply_tlora
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import train_tlora

    patcher, spec = tf.build("flux_dev", weight_dtype=FP8, compute_dtype=torch.float32)
    settings = TrainSettings(variant="vanilla_tlora", rank=RANK, min_rank=MIN_RANK, steps=2, optimizer="adamw", learning_rate=1e-3,
                             resolution=64)
    result = train_tlora(patcher, None, tf.stub_vae(patcher, spec), torch.rand(1, 64, 64, 3), None, settings,
                         str(tmp_path), "fp8/flux", conditioning=tf.conditioning(spec))
    tlora = moved_factors(result.tlora)
    cond = tf.conditioning(spec)
    x = torch.randn(tf.latent_shape(patcher, spec, 1, 64), generator=torch.Generator().manual_seed(5))
    got = predict_x0(apply_tlora(patcher, tlora, 1.0)[0], cond, x, [0.6])
    want = predict_x0(_reference("flux_dev", tlora, _paper_rank(600), source=patcher), cond, x, [0.6])
    assert (got - want).norm() / want.norm() < 1e-5
    assert patcher.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == FP8


def test_legacy_scaled_fp8_layers_add_the_update_once(tmp_path, path):
    """ComfyUI 0.3.75's scaled-fp8 layers multiply the weight by scale_weight after the weight
    functions ran: the update must not be scaled with it."""
    import comfy.supported_models_base

    from tlora_pack.trainer.runtime import apply_tlora
    from tlora_pack.trainer.train import find_target_layers, new_factors
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.tlora_core.config import TLoraConfig
    from tlora_pack.tlora_core.format import TLora
    from tlora_pack.trainer.train import fused_record

    if FP8 is None or not hasattr(comfy.supported_models_base.BASE, "scaled_fp8"):
        pytest.skip("this ComfyUI loads scaled fp8 as quantized tensors, dequantized before weight functions")
    original = comfy.supported_models_base.BASE.scaled_fp8
    comfy.supported_models_base.BASE.scaled_fp8 = FP8
    try:
        patcher, spec = tf.build("flux_dev", weight_dtype=FP8, compute_dtype=torch.float32)
    finally:
        comfy.supported_models_base.BASE.scaled_fp8 = original
    with torch.no_grad():
        for m in patcher.model.modules():
            if torch.is_tensor(getattr(m, "scale_weight", None)):
                m.scale_weight.fill_(2.0)
    sites = find_target_layers(patcher.model, "attention")
    config = TLoraConfig(rank=RANK, min_rank=MIN_RANK, variant="vanilla_tlora", base_model="Flux", family="Flux",
                         fused=fused_record(patcher.model, sites))
    tlora = moved_factors(TLora(config, new_factors(sites, TrainSettings(rank=RANK, min_rank=MIN_RANK), False,
                                             torch.device("cpu"))))
    cond = tf.conditioning(spec)
    x = torch.randn(tf.latent_shape(patcher, spec, 1, 64), generator=torch.Generator().manual_seed(6))
    got = predict_x0(apply_tlora(patcher, tlora, 1.0)[0], cond, x, [0.4])
    want = predict_x0(_reference("flux_dev", tlora, _paper_rank(400), source=patcher), cond, x, [0.4])
    assert (got - want).norm() / want.norm() < 1e-5


def test_gradient_checkpointing_of_flux_blocks_gives_the_same_gradients(tmp_path, monkeypatch):
    """Checkpointed double and single blocks (recomputed in backward with the step's masks, from their
    inputs as they were before Flux's in-place residual adds) give the gradients of plain backprop."""
    from support.grads import AdamWGradients, assert_same_gradients
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import train_tlora

    log, grads = AdamWGradients(monkeypatch), {}
    for checkpointing in (False, True):
        grads[checkpointing] = log.run()
        patcher, spec = tf.build("flux_dev")
        settings = TrainSettings(variant="vanilla_tlora", rank=RANK, min_rank=MIN_RANK, steps=3, optimizer="adamw", learning_rate=1e-3,
                                 resolution=64, gradient_checkpointing=checkpointing, storage="fp32")
        train_tlora(patcher, None, tf.stub_vae(patcher, spec), torch.rand(1, 64, 64, 3), None, settings,
                    str(tmp_path / str(checkpointing)), "gc/flux", conditioning=tf.conditioning(spec))
    assert_same_gradients(grads[False], grads[True])


@pytest.mark.parametrize("trained", ["flux_dev"], indirect=True)
def test_fused_slices_share_one_weight_function_per_weight(trained):
    """q, k, v of one fused qkv (and of linear1) are patched in one copy of the weight per call, not one
    whole-weight copy per slice; slices that would overlap (two keys on the same rows) get their own."""
    import types
    from tlora_pack.trainer.runtime import apply_tlora, shared_weight_functions

    _, patcher, _, result = trained
    _, runtime = apply_tlora(patcher, result.tlora)
    per_module = {path: [len(f.layers) for f in fns] for path, fns in runtime.weight_functions.items()}
    assert per_module["diffusion_model.double_blocks.0.img_attn.qkv"] == [3]
    assert per_module["diffusion_model.single_blocks.0.linear1"] == [3]
    assert per_module["diffusion_model.double_blocks.0.img_attn.proj"] == [1]

    def layer(rows):
        return types.SimpleNamespace(target=types.SimpleNamespace(module_path="m", rows=rows))
    a, b, again = layer((0, 4)), layer((4, 4)), layer((0, 4))
    groups = shared_weight_functions([b, again, a])["m"]
    assert sorted(len(g.layers) for g in groups) == [1, 2]
    assert all(g.layers == sorted(g.layers, key=lambda x: x.target.rows[0]) for g in groups)


@pytest.mark.parametrize("trained", ["flux_dev"], indirect=True)
def test_sampling_adds_dw_into_the_calls_weight_copy_and_never_into_a_weight_that_stays(trained, monkeypatch):
    """On the weight path, sampling adds each slice's dW into the copy ComfyUI hands the weight function (no
    second whole-weight copy: the same tensor comes back); the layer's parameter, or a weight handed on 0.33's
    dynamic-VRAM path (a module with `_v`, which may hand its resident weight), is never written."""
    from tlora_pack.trainer import runtime as rt

    monkeypatch.setattr(rt, "activations_cheaper", lambda *a: False)
    _, patcher, _, result = trained
    tlora, strength, t = moved_factors(result.tlora), 0.7, 300.0
    _, runtime = rt.apply_tlora(patcher, tlora, strength)
    path = "diffusion_model.single_blocks.0.linear1"
    module = patcher.model.get_submodule(path)
    function, = runtime.weight_functions[path]
    assert len(function.layers) == 3
    runtime.current = runtime.masks_for(torch.tensor([t]), torch.device("cpu"))
    original = module.weight.detach().clone()
    want = original.clone()
    for layer in function.layers:
        layer.module, layer.rows = module, 64
        offset, size = layer.target.rows
        want[offset:offset + size] += strength * dense_delta(layer.factors, _paper_rank(t))
    assert (want - original).norm() / original.norm() > 1e-3

    def close(got):
        return (got - want).norm() / want.norm() < 1e-6
    with torch.no_grad():
        copy = original.clone()
        assert function(copy) is copy and close(copy), "ComfyUI's copy for the call is patched in place"
        assert close(function(module.weight)) and torch.equal(module.weight, original), "the parameter stays W"
        monkeypatch.setattr(module, "_v", object(), raising=False)
        handed = original.clone()
        assert close(function(handed)) and torch.equal(handed, original), "a dynamic-VRAM weight stays as handed"
