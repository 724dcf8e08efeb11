"""Training follows each family's reference recipe (issue 18): the sigma draw, the optimiser (Prodigy with
clipping for the FLUX recipe, AdamW for the UNets), fp32 compute, the recipe's guidance and SD-XL size
conditioning, and the random crop per step. References are independent: scipy's KS test against the
uniform k/1000 law, prodigyopt's own optimiser built with the reference code's arguments, the dtype a
layer really sees."""
import logging

import pytest
import torch

from support import tiny_families as tf

pytestmark = pytest.mark.usefixtures("comfy")

DRAWS = 10_000


def _settings(**kw):
    from tlora_pack.trainer.settings import TrainSettings
    base = dict(rank=4, min_rank=2, steps=2, seed=0, resolution=64, save_every=0)
    base.update(kw)
    return TrainSettings(**base)


@pytest.mark.parametrize("name", ["flux_dev", "sd35", "zimage"])
def test_flow_families_draw_sigma_uniform_in_k_over_1000_unshifted(name):
    """The reference FLUX draw: sigma = k / 1000, k uniform in 1..1000, whatever shift the model has."""
    from scipy import stats
    from tlora_pack.trainer.loop import draw_sigmas
    from tlora_pack.trainer.train import model_family

    patcher, _ = tf.build(name)
    settings = _settings().for_recipe(model_family(patcher.model).recipe)
    assert settings.sigma_draw == "flow"
    sigmas = draw_sigmas(settings.sigma_draw, patcher.model.model_sampling, DRAWS, torch.Generator().manual_seed(0))
    k = sigmas.double() * 1000
    assert torch.allclose(k, k.round(), atol=1e-3) and k.min() >= 1 and k.max() <= 1000
    # KS against the discrete uniform law on k / 1000 (its CDF at x is floor(1000 x) / 1000)
    result = stats.kstest(sigmas.numpy(), lambda x: (x * 1000 + 1e-6).astype(int).clip(0, 1000) / 1000)
    assert result.pvalue > 1e-3, result
    # the model's own (shifted) table would fail it: Flux-dev's and SD3's shift puts more mass at high sigma
    table = patcher.model.model_sampling.sigmas.float()
    shifted = table[torch.randint(0, len(table), (DRAWS,), generator=torch.Generator().manual_seed(0))]
    if float(table.mean()) > 0.55:
        assert stats.kstest(shifted.numpy(), lambda x: x.clip(0, 1)).pvalue < 1e-6


def test_sd_xl_draws_t_uniform_over_its_1000_training_timesteps():
    from scipy import stats
    from tlora_pack.trainer.loop import draw_sigmas
    from tlora_pack.trainer.train import model_family

    patcher, _ = tf.build("sdxl")
    settings = _settings().for_recipe(model_family(patcher.model).recipe)
    assert settings.sigma_draw == "timestep"
    ms = patcher.model.model_sampling
    sigmas = draw_sigmas(settings.sigma_draw, ms, DRAWS, torch.Generator().manual_seed(0))
    t = torch.searchsorted(ms.sigmas.float().cpu(), sigmas)  # the index of each drawn sigma in the table
    assert torch.equal(ms.sigmas.float().cpu()[t], sigmas) and len(ms.sigmas) == 1000
    assert stats.chisquare(torch.bincount(t // 100, minlength=10).numpy()).pvalue > 1e-3


def test_a_flow_draw_on_a_discrete_model_is_refused_by_name():
    from tlora_pack.tlora_core.errors import TLoraError
    from tlora_pack.trainer.loop import draw_sigmas

    patcher, _ = tf.build("sdxl")
    with pytest.raises(TLoraError, match="sigma_draw 'flow' needs a flow model.*ModelSampling"):
        draw_sigmas("flow", patcher.model.model_sampling, 1, torch.Generator())


@pytest.mark.parametrize("name, optimizer, lr, clip, draw, crop", [
    ("flux_dev", "prodigy", 1.0, 1.0, "flow", "random"),
    ("qwen_image", "prodigy", 1.0, 1.0, "flow", "random"),
    ("sdxl", "adamw", 1e-4, 0.0, "timestep", "centre"),
])
def test_auto_settings_are_the_reference_recipe_of_the_family(name, optimizer, lr, clip, draw, crop):
    from tlora_pack.trainer.train import model_family

    patcher, _ = tf.build(name)
    s = _settings().for_recipe(model_family(patcher.model).recipe)
    assert (s.optimizer, s.learning_rate, s.max_grad_norm, s.sigma_draw, s.crop) == (optimizer, lr, clip, draw, crop)
    # an optimiser chosen by hand brings its own learning rate and clipping; a set learning rate is kept
    hand = _settings(optimizer="adamw").for_recipe(model_family(patcher.model).recipe)
    assert (hand.optimizer, hand.learning_rate, hand.max_grad_norm) == ("adamw", 1e-4, 0.0)
    assert _settings(learning_rate=0.5).for_recipe(model_family(patcher.model).recipe).learning_rate == 0.5


def test_prodigy_steps_equal_prodigyopts_own_with_the_reference_arguments_and_clipping():
    """Steps of the pack's optimiser (build + clip + step) against prodigyopt.Prodigy built with the
    reference FLUX code's arguments (flux/run.py defaults) and torch's clip_grad_norm_ at 1.0."""
    import prodigyopt
    from tlora_pack.trainer.optim import build_optimizer, optimizer_step

    shapes = [(4, 6), (6, 4), (1, 4)]
    ours = [torch.randn(s, generator=torch.Generator().manual_seed(i)).requires_grad_() for i, s in enumerate(shapes)]
    with torch.no_grad():
        ours[1].zero_()  # Vanilla T-LoRA's up factor starts at zero: Prodigy keeps a scalar p0 for it
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = build_optimizer("prodigy", ours, 1.0, 1e-4)
    ref_opt = prodigyopt.Prodigy(ref, lr=1.0, betas=(0.9, 0.999), beta3=None, weight_decay=1e-4, eps=1e-8,
                                 decouple=True, use_bias_correction=True, safeguard_warmup=True)

    def loss(params):  # pulls every value towards 5: a steady direction, so Prodigy's d grows
        return sum(((p - 5) ** 2).sum() for p in params)
    for step in range(40):  # d leaves d0 after ~12 steps and grows ~20x by step 40
        optimizer_step(opt, loss(ours), ours, 1.0, None, lambda value: value.backward())
        ref_opt.zero_grad()
        loss(ref).backward()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a.detach(), b.detach()), step
    assert opt.param_groups[0]["d"] == ref_opt.param_groups[0]["d"] > 1e-5  # its step size estimate grew


def test_clipping_and_the_fp16_grad_scaler_unscale_before_they_clip():
    """With a GradScaler the gradients are unscaled before clipping, so the step equals an unscaled one."""
    from tlora_pack.trainer.optim import build_optimizer, optimizer_step

    p = torch.ones(3, requires_grad=True)
    q = torch.ones(3, requires_grad=True)
    g = torch.tensor([30.0, -40.0, 0.0])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    a, b = build_optimizer("adamw", [p], 1e-1, 0.0), build_optimizer("adamw", [q], 1e-1, 0.0)
    optimizer_step(a, (p * g).sum(), [p], 1.0, scaler, lambda v: v.backward())
    optimizer_step(b, (q * g).sum(), [q], 1.0, None, lambda v: v.backward())
    assert torch.allclose(p.grad, g / 50) and torch.allclose(p, q)  # norm 50 clipped to 1, scale undone


def test_prodigy_needs_a_learning_rate_near_one_and_says_so():
    from tlora_pack.tlora_core.errors import TLoraError
    from tlora_pack.trainer.optim import build_optimizer

    with pytest.raises(TLoraError, match="learning_rate 0.0001 with the Prodigy optimiser.*learning_rate 0"):
        build_optimizer("prodigy", [torch.zeros(2, requires_grad=True)], 1e-4, 1e-4)


def test_a_missing_prodigyopt_is_named_with_its_install_command(monkeypatch):
    import builtins
    from tlora_pack.tlora_core.errors import TLoraError
    from tlora_pack.trainer.optim import build_optimizer

    real_import = builtins.__import__

    def no_prodigy(name, *args, **kwargs):
        if name == "prodigyopt":
            raise ImportError("No module named 'prodigyopt'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_prodigy)
    with pytest.raises(TLoraError, match=r"'prodigyopt' package.*-m pip install prodigyopt"):
        build_optimizer("prodigy", [torch.zeros(2, requires_grad=True)], 1.0, 1e-4)


def _train_flux(tmp_path, image, **kw):
    from tlora_pack.trainer.train import train_tlora

    patcher, spec = tf.build("flux_dev")
    seen = []
    patcher = patcher.clone()
    patcher.add_wrapper_with_key("apply_model", "test-sigmas",
                                 lambda executor, x, t, *a, **k: seen.append((x.shape, float(t[0]))) or executor(x, t, *a, **k))
    settings = _settings(variant="vanilla_tlora", rank=4, min_rank=1, storage="fp32", **kw)
    result = train_tlora(patcher, None, tf.stub_vae(patcher, spec), image, None, settings, str(tmp_path), "r/run",
                         conditioning=tf.conditioning(spec))
    return result, seen


def test_flux_trains_with_prodigy_at_unshifted_sigmas_on_random_squares(tmp_path):
    """Through train_tlora on the tiny Flux-dev: every sigma is a k/1000 (not a shifted table value), the
    model sees squares of the short side cut from a wide image, the file records the recipe, and the
    same seed repeats the run exactly."""
    from safetensors.torch import load_file

    wide = torch.rand(1, 64, 128, 3, generator=torch.Generator().manual_seed(3))
    result, seen = _train_flux(tmp_path / "a", wide, steps=3)
    assert len(seen) == 3
    for shape, sigma in seen:
        assert shape[-2:] == (8, 8)  # 64 px short side, the stub VAE's 8 px per latent cell
        assert abs(sigma * 1000 - round(sigma * 1000)) < 1e-3
    record = result.tlora.config.training
    assert (record["optimizer"], record["learning_rate"], record["max_grad_norm"], record["sigma_draw"],
            record["crop"]) == ("prodigy", 1.0, 1.0, "flow", "random")
    again, _ = _train_flux(tmp_path / "b", wide, steps=3)
    first, second = load_file(str(result.saved[-1])), load_file(str(again.saved[-1]))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_random_squares_differ_per_step_and_repeat_with_the_seed():
    from tlora_pack.trainer.loop import random_squares

    latents = torch.arange(2 * 1 * 4 * 12, dtype=torch.float32).reshape(2, 1, 4, 12)
    weights = latents[:, :1] * 10

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return [random_squares(latents, weights, torch.tensor([1]), gen) for _ in range(6)]
    crops = run(0)
    lefts = set()
    for x0, w in crops:
        assert x0.shape == (1, 1, 4, 4)
        left = int(x0[0, 0, 0, 0] - latents[1, 0, 0, 0])  # where the square starts in image 1
        assert torch.equal(x0[0], latents[1, :, :, left:left + 4]) and torch.equal(w[0], weights[1, :, :, left:left + 4])
        lefts.add(left)
    assert len(lefts) > 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(crops, run(0)))


def test_random_crop_keeps_the_whole_image_at_the_short_side():
    from tlora_pack.trainer.data import prepare_images

    image = torch.rand(1, 300, 450, 3)
    pixels, weights = prepare_images(image, torch.ones(1, 300, 450), 128, 1024, crop="random")
    assert pixels.shape == (1, 128, 192, 3) and weights.shape == (1, 128, 192)
    square, _ = prepare_images(image, None, 128, 1024)
    assert square.shape == (1, 128, 128, 3)


def test_missing_guidance_is_filled_with_the_recipes_and_a_connected_one_is_kept(caplog):
    from tlora_pack.trainer.train import training_conditioning

    cond = torch.zeros(1, 4, 8)
    given = [[cond, {"pooled_output": cond[:, 0]}], [cond, {"guidance": 3.5}]]
    with caplog.at_level(logging.INFO):
        out = training_conditioning(None, given, "unused", {"guidance": 1.0})
    assert [extra["guidance"] for _, extra in out] == [1.0, 3.5]
    assert "without guidance: using the recipe's guidance 1.0" in caplog.text
    assert "guidance" not in given[0][1]  # the CONDITIONING the node received is not changed


def test_sd_xl_trains_with_the_references_size_conditioning():
    from tlora_pack.tlora_core.families import family_named
    from tlora_pack.trainer.train import recipe_extras

    photo, pixels = torch.zeros(1, 900, 1400, 3), torch.zeros(1, 1024, 1024, 3)
    assert recipe_extras(family_named("SD-XL").recipe, photo, pixels) == {
        "width": 900, "height": 900, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024}
    assert recipe_extras(family_named("SD1.x").recipe, photo, pixels) == {}
    assert recipe_extras(family_named("Flux").recipe, photo, pixels) == {"guidance": 1.0}


@pytest.mark.parametrize("training_dtype, seen_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_fp32_training_computes_the_model_in_fp32(tmp_path, training_dtype, seen_dtype):
    """A model stored and computing in bf16 trains in float32 with training_dtype fp32 (every layer's input
    and the weight it multiplies by), and in bf16 under bf16 autocast."""
    from tlora_pack.trainer.train import train_tlora

    patcher, spec = tf.build("sd35", weight_dtype=torch.bfloat16)
    assert patcher.model.get_dtype() == torch.bfloat16 and patcher.model.manual_cast_dtype is None
    layer = patcher.model.diffusion_model.joint_blocks[0].x_block.mlp.fc1
    seen = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    try:
        train_tlora(patcher, None, tf.stub_vae(patcher, spec), torch.rand(1, 64, 64, 3), None,
                    _settings(variant="vanilla_tlora", optimizer="adamw", learning_rate=1e-3,
                              training_dtype=training_dtype),
                    str(tmp_path), "d/run", conditioning=tf.conditioning(spec))
    finally:
        handle.remove()
    assert seen and all(dtypes == (seen_dtype, seen_dtype) for dtypes in seen), seen
    import comfy.model_management
    comfy.model_management.load_models_gpu([patcher])  # the node's own model, loaded again, is as it was
    assert patcher.model.manual_cast_dtype is None
