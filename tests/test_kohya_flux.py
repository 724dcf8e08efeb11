"""The sd-scripts network module on Flux (flux_train_network.py's contract, networks/lora_flux.py's calls).

sd-scripts is not installed here. Its Flux (library/flux_models.py) and ComfyUI's (comfy/ldm/flux) both follow
BFL's layout, so the stand-in is ComfyUI's own tiny Flux (support.tiny_families) with sd-scripts' forward
signature, forward(img, img_ids, txt, txt_ids, timesteps, y, ..., guidance=...), called as
flux_train_network.py calls it: timesteps / 1000. The reference is a second copy whose weights get dW added by
hand, each projection of a fused qkv / linear1 weight on rows found from the model's width, not by the pack.
"""
from argparse import Namespace

import pytest
import torch

from support.dense import dense_delta, paper_rank
from support import tiny_families as tf
from support.predict import predict_x0

pytestmark = pytest.mark.usefixtures("comfy")

RANK, MIN_RANK = 4, 1
WIDTH = 256  # the tiny Flux's hidden size: q, k and v of a fused weight are WIDTH rows each


def _sd_scripts_forward(self, img, img_ids, txt, txt_ids, timesteps, y, block_controlnet_hidden_states=None,
                        block_controlnet_single_hidden_states=None, guidance=None, txt_attention_mask=None,
                        mod_vectors=None):
    """sd-scripts' Flux.forward signature; ComfyUI's forward_orig takes the same sigma-valued timesteps."""
    return self.forward_orig(img, img_ids, txt, txt_ids, timesteps, y, guidance)


def as_sd_scripts(dm):
    """ComfyUI's Flux diffusion model, called as sd-scripts' Flux (its class name too); weights unchanged."""
    dm.__class__ = type("Flux", (type(dm),), {"forward": _sd_scripts_forward})
    return dm


def sd_scripts_flux(name="flux_dev", seed=0):
    """A tiny random Flux as sd-scripts holds it (seed 0: the same weights as tf.build's)."""
    return as_sd_scripts(tf.build(name, seed)[0].model.diffusion_model)


def flux_inputs(sigmas, seed=5, tokens=16, text=8):
    """flux_train_network.py's keyword arguments for packed latents at these sigmas."""
    g = torch.Generator().manual_seed(seed)
    n = len(sigmas)
    return dict(img=torch.randn(n, tokens, 64, generator=g),
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                   indexing="ij"), -1).reshape(1, tokens, 3).expand(n, -1, -1),
                txt=torch.randn(n, text, 64, generator=g), txt_ids=torch.zeros(n, text, 3),
                y=torch.randn(n, 32, generator=g), timesteps=(torch.tensor(sigmas) * 1000) / 1000,  # 1000 sigma, / 1000
                guidance=torch.full((n,), 3.5))


def create(flux, network_dim=RANK, **args):
    """train_network.py's order for Flux: create_network(ae, [CLIP-L, T5-XXL], flux), prepare_network, apply_to."""
    from tlora_pack.tlora_core import kohya

    network = kohya.create_network(1.0, network_dim, None, None, [None, None], flux, neuron_dropout=None,
                                   dropout=None, **{"seed": "7", **args})
    network.prepare_network(Namespace(save_model_as="safetensors"))
    network.apply_to([None, None], flux, False, True)
    return network


def perturb(network, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))



def dense_reference(layers, keep):
    """ComfyUI's tiny Flux (ModelPatcher) of the same seed with W + dW(keep) set by hand, row by row."""
    patcher, _ = tf.build("flux_dev")
    flux = patcher.model.diffusion_model
    with torch.no_grad():
        for key, f in layers.items():
            path = key[len("diffusion_model."):]
            part = path.rsplit(".", 1)[1]
            if part in ("q", "k", "v"):
                offset = "qkv".index(part) * WIDTH
                flux.get_submodule(path.rsplit(".", 1)[0]).weight[offset:offset + WIDTH] += dense_delta(f, keep)
            else:
                flux.get_submodule(path).weight += dense_delta(f, keep)
    return patcher


def test_network_adapts_each_flux_projection_with_the_family_recipe():
    flux = sd_scripts_flux()
    network = create(flux, network_dim=None)
    cfg = network.config
    assert network.train_t5xxl is False  # flux_train_network.py reads it after create_network
    assert (cfg.family, cfg.base_model, cfg.variant, cfg.rank, cfg.min_rank) == ("Flux", "Flux", "vanilla_tlora", 32, 1)
    double = "diffusion_model.double_blocks.0."
    want = {double + f"{s}_attn.qkv.{p}" for s in ("img", "txt") for p in "qkv"} | {double + "img_attn.proj"}
    want |= {f"diffusion_model.single_blocks.{i}.linear1.{p}" for i in range(2) for p in "qkv"}
    assert set(network.layers) == want
    linear1_rows = 3 * WIDTH + 4 * WIDTH  # q, k, v and the MLP (ratio 4)
    assert cfg.fused[double + "img_attn.qkv.k"] == [double + "img_attn.qkv", WIDTH, WIDTH, 3 * WIDTH]
    assert cfg.fused["diffusion_model.single_blocks.1.linear1.v"] == [
        "diffusion_model.single_blocks.1.linear1", 2 * WIDTH, WIDTH, linear1_rows]
    assert set(cfg.fused) == want - {double + "img_attn.proj"}
    assert all(a.up.shape == (WIDTH, 32) for a in network.layers.values())


def test_network_args_override_the_recipe_and_schnell_is_named():
    from tlora_pack.tlora_core.errors import TLoraConfigError

    flux = sd_scripts_flux("flux_schnell")
    network = create(flux, network_dim=8, variant="tlora", targets="attention+feedforward")
    cfg = network.config
    assert (cfg.base_model, cfg.family, cfg.variant, cfg.rank, cfg.min_rank) == ("FluxSchnell", "Flux", "tlora", 8, 1)
    assert "diffusion_model.single_blocks.0.linear2" in network.layers
    assert "diffusion_model.double_blocks.0.txt_mlp.2" in network.layers
    with pytest.raises(TLoraConfigError, match="target set"):
        create(sd_scripts_flux("flux_schnell"), targets="to_q,to_k")


def test_each_sample_gets_the_mask_of_1000_times_its_timestep():
    flux = sd_scripts_flux()
    network = create(flux, min_rank=str(MIN_RANK))
    perturb(network)
    sigmas = [0.05, 0.97, 0.5]
    keeps = [paper_rank(1000 * s, RANK, MIN_RANK) for s in sigmas]
    assert keeps == [3, 1, 2]  # three different ranks, none of them full
    inputs = flux_inputs(sigmas)
    out = flux(**inputs).detach()  # with grad, as in training: the call's masks stay for its backward
    assert network.current.ranks == keeps
    for i, keep in enumerate(keeps):
        reference = as_sd_scripts(dense_reference({k: a.factors() for k, a in network.layers.items()},
                                                  keep).model.diffusion_model)
        with torch.no_grad():
            want = reference(**{k: v[i:i + 1] for k, v in inputs.items()})
        torch.testing.assert_close(out[i:i + 1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["vanilla_tlora", "tlora"])
def test_saved_file_loads_in_comfyui_and_equals_dense_weights(tmp_path, variant):
    """save_weights -> Load T-LoRA's path (apply_tlora on ComfyUI's Flux) = W + dW(r(1000 sigma)) by hand;
    create_network_from_weights gives the sd-scripts side the same network back."""
    from tlora_pack.tlora_core import kohya
    from tlora_pack.tlora_core.format import load_tlora
    from tlora_pack.trainer.runtime import apply_tlora

    flux = sd_scripts_flux()
    network = create(flux, min_rank=str(MIN_RANK), variant=variant)
    perturb(network)
    path = tmp_path / "flux_tlora.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "tlora_core.kohya"})
    tlora = load_tlora(path)
    assert (tlora.config.family, tlora.config.base_model, tlora.config.fused) == ("Flux", "Flux", network.config.fused)

    sigma = 0.6
    keep = paper_rank(1000 * sigma, RANK, MIN_RANK)
    patcher, _ = tf.build("flux_dev")  # the same weights in ComfyUI, without sd-scripts' hooks
    applied, runtime = apply_tlora(patcher, tlora, 1.0)
    spec = tf.TINY["flux_dev"]
    cond = tf.conditioning(spec)
    x = torch.randn(tf.latent_shape(patcher, spec, 1, 64), generator=torch.Generator().manual_seed(3))
    got = predict_x0(applied, cond, x, [sigma])
    assert runtime.last.ranks == [keep]
    reference = dense_reference(tlora.layers, keep)
    want = predict_x0(reference, cond, x, [sigma])
    effect = (want - predict_x0(patcher, cond, x, [sigma])).norm()
    assert effect > 1e-4 * want.norm(), "the T-LoRA changes the output"
    assert (got - want).norm() < 1e-3 * effect

    inputs = flux_inputs([0.2, 0.8])
    with torch.no_grad():
        trained = flux(**inputs)
    flux2 = sd_scripts_flux()
    network2, _ = kohya.create_network_from_weights(1, str(path), None, [None, None], flux2)
    network2.apply_to([None, None], flux2, False, True)
    with torch.no_grad():
        assert torch.equal(flux2(**inputs), trained)


def differentiable(flux):
    """sd-scripts' Flux adds each residual out of place; ComfyUI's adds it in place (`x += ...`) after a
    LayerNorm saved the stream for backward. Each block and each LayerNorm in it gets its own copy of its
    input, so backward runs through the stand-in as through sd-scripts' Flux (values unchanged)."""
    own = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731

    def on_copies(forward):
        return lambda *a, **k: forward(*map(own, a), **{name: own(v) for name, v in k.items()})

    for block in list(flux.double_blocks) + list(flux.single_blocks):
        block.forward = on_copies(block.forward)
        for module in block.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.register_forward_pre_hook(lambda m, args: (args[0].clone(),) + args[1:])
    return flux


def checkpoint_blocks(flux):
    """sd-scripts' Flux under --gradient_checkpointing: each double / single block runs through a
    non-reentrant torch checkpoint, so backward recomputes it with whatever the hooks hold then."""
    from torch.utils.checkpoint import checkpoint

    for block in list(flux.double_blocks) + list(flux.single_blocks):
        plain = block.forward
        block.forward = lambda *a, _plain=plain, **k: checkpoint(_plain, *a, use_reentrant=False, **k)
    return flux


def dop_step_grads(gradient_checkpointing: bool) -> list[torch.Tensor]:
    """The factors' gradients of one flux_train_network.py step with differential output preservation on
    one of two samples: the main call, the prior call at multiplier 0 inside `torch.no_grad()` that call_dit
    turns back into a grad-enabled call, the prior written into the target, then backward."""
    flux = differentiable(sd_scripts_flux())
    if gradient_checkpointing:
        checkpoint_blocks(flux)
    network = create(flux, min_rank=str(MIN_RANK))
    perturb(network)
    network.prepare_grad_etc(None, flux)
    inputs = flux_inputs([0.9, 0.2])  # the prior sample's t masks fewer components than the other's
    for name in ("txt", "y", "guidance"):  # sd-scripts' checkpointing workaround: conditions require grad
        inputs[name].requires_grad_(True)
    pred = flux(**inputs)
    target = torch.randn(pred.shape, generator=torch.Generator().manual_seed(9))
    dop = [1]
    network.set_multiplier(0.0)
    with torch.no_grad(), torch.set_grad_enabled(True):  # call_dit: set_grad_enabled(is_train)
        prior = flux(**{k: v[dop] for k, v in inputs.items()})
    network.set_multiplier(1.0)
    target[dop] = prior.to(target.dtype)
    torch.nn.functional.mse_loss(pred, target).backward()
    return [p.grad.clone() for p in network.parameters()]


def test_dop_prior_call_keeps_the_main_calls_masks_for_checkpointed_backward(comfy, monkeypatch):
    """sd-scripts' DOP pattern gives the same gradients with and without gradient checkpointing: the
    recomputed main call sees its own masks, the multiplier-0 call leaves nothing for backward."""
    # newer ComfyUI's Flux uses a rope kernel without autograd unless this flag is up (sd-scripts' has autograd)
    monkeypatch.setattr(comfy.model_management, "in_training", True, raising=False)
    plain, checkpointed = dop_step_grads(False), dop_step_grads(True)
    assert any(g.abs().sum() > 0 for g in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))
