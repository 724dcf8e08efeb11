"""The sd-scripts network module (tlora_core.kohya), driven through the calls train_network.py makes.

sd-scripts itself is not installable here, so the tests build tiny UNets whose module paths, class names
and forward signatures follow sd-scripts' own UNets (library/original_unet.py: diffusers paths,
forward(sample, timestep, encoder_hidden_states); library/sdxl_original_unet.py: ldm paths,
forward(x, timesteps, context, y)) and replay train_network.py's sequence on them.
"""
import copy
import json
import os
import subprocess
import sys
import types
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if "tlora_pack" not in sys.modules:  # tests/conftest.py normally registers the pack under this name
    _pack = types.ModuleType("tlora_pack")
    _pack.__path__ = [str(ROOT)]
    sys.modules["tlora_pack"] = _pack

from tlora_pack.tlora_core import kohya  # noqa: E402
from tlora_pack.tlora_core.adapter import delta_weight  # noqa: E402
from tlora_pack.tlora_core.errors import TLoraConfigError, TLoraError, TLoraFormatError  # noqa: E402
from tlora_pack.tlora_core.format import load_tlora, read_safetensors  # noqa: E402
from tlora_pack.tlora_core.schedule import rank_at, rank_masks  # noqa: E402

DIM, CTX, RANK, MIN_RANK = 16, 12, 8, 4
VARIANTS = ["tlora", "vanilla_tlora", "ortho_lora", "lora"]


# --- tiny UNets named like sd-scripts' ------------------------------------------------------------
class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim=None, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None):
        ctx = x if context is None else context
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        h = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx)))
        return self.to_out[0](h.transpose(1, 2).reshape(x.shape))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn1, self.attn2, self.ff = CrossAttention(dim), CrossAttention(dim, context_dim), FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim)])
        self.proj_out = nn.Linear(dim, dim)
        self.gradient_checkpointing = False

    def body(self, h, context):
        b, c, hh, ww = h.shape
        x = self.proj_in(h.permute(0, 2, 3, 1).reshape(b, hh * ww, c))
        for block in self.transformer_blocks:
            x = block(x, context)
        return self.proj_out(x).reshape(b, hh, ww, c).permute(0, 3, 1, 2) + h

    def forward(self, h, context):
        if self.gradient_checkpointing and self.training:  # sd-scripts' SD-XL UNet uses use_reentrant=True
            return torch.utils.checkpoint.checkpoint(self.body, h, context, use_reentrant=True)
        return self.body(h, context)


def sinusoid(t, dim):
    freqs = torch.exp(-torch.arange(dim // 2, dtype=torch.float32) * (9.21 / (dim // 2)))
    args = t.float().reshape(-1, 1) * freqs
    return torch.cat([args.sin(), args.cos()], dim=1)


class AttnBlock(nn.Module):  # CrossAttnDownBlock2D / UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D
    def __init__(self):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel(DIM, CTX)])


class UNet2DConditionModel(nn.Module):
    """SD1.x-shaped (diffusers paths, as sd-scripts' original_unet)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, DIM, 3, padding=1)
        self.time_embedding = nn.Linear(DIM, DIM)
        self.down_blocks = nn.ModuleList([AttnBlock()])
        self.mid_block = AttnBlock()
        self.up_blocks = nn.ModuleList([nn.Identity(), AttnBlock()])  # SD1.5's up_blocks.0 has no attention
        self.conv_out = nn.Conv2d(DIM, 4, 3, padding=1)

    def enable_gradient_checkpointing(self):
        for m in self.modules():
            if isinstance(m, Transformer2DModel):
                m.gradient_checkpointing = True

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        h = self.conv_in(sample) + self.time_embedding(sinusoid(t, DIM))[:, :, None, None]
        for block in (self.down_blocks[0], self.mid_block, self.up_blocks[1]):
            h = block.attentions[0](h, encoder_hidden_states)
        return types.SimpleNamespace(sample=self.conv_out(h))


class SdxlUNet2DConditionModel(nn.Module):
    """SD-XL-shaped (ldm paths, as sd-scripts' sdxl_original_unet)."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Linear(DIM, DIM)
        self.label_emb = nn.Linear(6, DIM)
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(4, DIM, 3, padding=1)])] +
                                          [nn.ModuleList([nn.Identity()]) for _ in range(3)] +
                                          [nn.ModuleList([nn.Identity(), Transformer2DModel(DIM, CTX)])])
        self.middle_block = nn.ModuleList([nn.Identity(), Transformer2DModel(DIM, CTX), nn.Identity()])
        self.output_blocks = nn.ModuleList([nn.ModuleList([nn.Identity(), Transformer2DModel(DIM, CTX)])])
        self.out = nn.ModuleList([nn.Conv2d(DIM, 4, 3, padding=1)])

    def forward(self, x, timesteps=None, context=None, y=None):
        timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(sinusoid(timesteps, DIM)) + self.label_emb(y)
        h = x
        for module in [*self.input_blocks, self.middle_block, *self.output_blocks, self.out]:
            for layer in module:
                h = layer(h, context) if isinstance(layer, Transformer2DModel) else layer(h)
            if module is self.input_blocks[0]:
                h = h + emb[:, :, None, None]
        return h


def make_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel()


def batch(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 5, CTX, generator=g)


def build(unet, variant="tlora", **args):
    """train_network.py's order: create_network, prepare_network, apply_to (UNet only)."""
    net_args = {"min_rank": str(MIN_RANK), "variant": variant, "seed": "7", **args}  # --network_args: strings
    network = kohya.create_network(1.0, RANK, 1.0, None, None, unet, neuron_dropout=None, dropout=None, **net_args)
    network.prepare_network(Namespace(save_model_as="safetensors"))
    network.apply_to(None, unet, False, True)
    return network


def perturb(network, seed=3):
    """Move the trainable factors away from their init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# --- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_output_at_init_equals_the_unadapted_model_exactly(variant):
    unet = make_unet()
    x, ctx = batch()
    t = torch.tensor([0, 500, 999])
    expected = unet(x, t, ctx).sample
    network = build(unet, variant)
    assert len(network.layers) == 3 * 2 * 4  # 3 transformers x attn1/attn2 x to_q/k/v/out
    assert torch.equal(unet(x, t, ctx).sample, expected)
    network.remove()
    assert torch.equal(unet(x, t, ctx).sample, expected)


def test_training_sequence_save_and_reload_give_the_same_update(tmp_path):
    unet = make_unet()
    base_state = copy.deepcopy(unet.state_dict())
    network = build(unet)
    network.enable_gradient_checkpointing()
    groups, descriptions = network.prepare_optimizer_params(None, 2e-3, 1e-4)
    assert descriptions == ["unet"] and groups[0]["lr"] == 2e-3
    optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)
    unet.requires_grad_(False)
    network.prepare_grad_etc(None, unet)
    network.on_epoch_start(None, unet)
    base_buffers = {k: v.clone() for k, v in network.named_buffers()}
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        x, ctx = batch(seed=int(torch.randint(0, 100, (1,), generator=g)))
        timesteps = torch.randint(0, 1000, (3,), generator=g)  # one t per sample, as sd-scripts draws them
        loss = F.mse_loss(unet(x, timesteps, ctx).sample.float(), torch.randn(x.shape, generator=g))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    assert all(torch.equal(v, base_state[k]) for k, v in unet.state_dict().items())  # base weights untouched
    assert all(torch.equal(v, base_buffers[k]) for k, v in network.named_buffers())  # frozen factors untouched
    assert all(not b.requires_grad for b in network.buffers())
    assert set(map(id, optimizer.state)) == {id(p) for p in network.parameters()}  # no state for base_*
    assert any(not torch.equal(a.down, a.base_down) for a in network.layers.values())

    path = tmp_path / "tlora.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_learning_rate": "0.002", "ss_tag_frequency": "{}"})
    tlora = load_tlora(path)
    cfg = tlora.config
    assert (cfg.rank, cfg.min_rank, cfg.variant, cfg.base_model, cfg.source) == (RANK, MIN_RANK, "tlora", "SD15",
                                                                                 "kohya-sd-scripts")
    assert cfg.training["ss_learning_rate"] == "0.002" and "ss_tag_frequency" not in cfg.training
    assert cfg.training["targets"] == ["to_q", "to_k", "to_v", "to_out"]
    assert set(tlora.layers) == set(network.layers)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in tlora.layers
    for t in (0, 400, 999):
        mask = rank_masks(torch.tensor([t]), RANK, MIN_RANK)[0]
        ours = network.delta_weights(t)
        for key, f in tlora.layers.items():
            assert torch.equal(delta_weight(f, mask), ours[key]), (key, t)

    x, ctx = batch(seed=42)
    t = torch.tensor([10, 600, 990])
    network.eval()
    trained = unet(x, t, ctx).sample
    # --dim_from_weights path: create_network_from_weights, apply_to, load_weights
    unet2 = make_unet()
    network2, tensors = kohya.create_network_from_weights(1, str(path), None, None, unet2)
    network2.apply_to(None, unet2, False, True)
    assert "loaded" in network2.load_weights(str(path))
    assert torch.equal(unet2(x, t, ctx).sample, trained)
    assert any(k.endswith(".tlora_base_down") for k in tensors)
    # --network_weights path (continue training): a fresh network, then load_weights
    unet3 = make_unet()
    network3 = build(unet3)
    network3.load_weights(str(path))
    assert torch.equal(unet3(x, t, ctx).sample, trained)


def test_at_high_t_only_the_first_r_t_components_get_gradient():
    unet = make_unet()
    network = build(unet)
    network.prepare_grad_etc(None, unet)
    x, ctx = batch()
    t = torch.tensor([999, 999, 999])
    r = rank_at(999, RANK, MIN_RANK)
    assert r == MIN_RANK
    unet(x, t, ctx).sample.square().mean().backward()
    for a in network.layers.values():
        assert a.down.grad[r:].abs().max() == 0 and a.up.grad[:, r:].abs().max() == 0
        assert a.scale.grad[r:].abs().max() == 0
    assert all(a.down.grad[:r].abs().max() > 0 and a.scale.grad[:r].abs().max() > 0 for a in network.layers.values())


def test_unmasked_variant_trains_the_full_rank_at_high_t():
    unet = make_unet()
    network = build(unet, "ortho_lora")
    network.prepare_grad_etc(None, unet)
    x, ctx = batch()
    unet(x, torch.tensor([999, 999, 999]), ctx).sample.square().mean().backward()
    assert all(a.scale.grad[RANK - 1].abs() > 0 for a in network.layers.values())


def test_every_sample_gets_the_mask_of_its_own_timestep():
    unet = make_unet()
    reference = copy.deepcopy(unet)
    network = build(unet)
    perturb(network)
    x, ctx = batch()
    t = torch.tensor([0, 999, 500])
    out = unet(x, t, ctx).sample
    ranks = [rank_at(v, RANK, MIN_RANK) for v in t.tolist()]
    assert len(set(ranks)) == 3
    for i, ti in enumerate(t.tolist()):
        dense = copy.deepcopy(reference)
        for key, dw in network.delta_weights(ti).items():
            dense.get_submodule(network._targets[key][0]).weight.data += dw
        expected = dense(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]).sample
        torch.testing.assert_close(out[i:i + 1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the no-grad call, by design
def test_checkpoint_recompute_keeps_the_masks_of_its_call_across_a_no_grad_call():
    """sd-scripts' differential output preservation calls the UNet (no grad, a subset) before backward."""
    grads = []
    for interleave in (False, True):
        unet = make_unet()
        unet.enable_gradient_checkpointing()
        unet.train()
        network = build(unet)
        perturb(network)
        network.prepare_grad_etc(None, unet)
        x, ctx = batch()
        x.requires_grad_(True)  # sd-scripts does this under --gradient_checkpointing
        loss = unet(x, torch.tensor([100, 900, 500]), ctx).sample.square().mean()
        if interleave:
            network.set_multiplier(0.0)
            with torch.no_grad():
                unet(x[:1], torch.tensor([999]), ctx[:1])
            network.set_multiplier(1.0)
        loss.backward()
        grads.append([p.grad.clone() for p in network.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_multiplier_zero_gives_the_base_output():
    unet = make_unet()
    x, ctx = batch()
    t = torch.tensor([3, 300, 700])
    expected = unet(x, t, ctx).sample
    network = build(unet)
    perturb(network)
    assert not torch.equal(unet(x, t, ctx).sample, expected)
    network.set_multiplier(0.0)
    assert torch.equal(unet(x, t, ctx).sample, expected)


def test_sdxl_unet_gets_ldm_keys_and_reads_timesteps_by_keyword(tmp_path):
    torch.manual_seed(0)
    unet = SdxlUNet2DConditionModel()
    x, ctx = batch(2)
    y = torch.randn(2, 6)
    expected = unet(x, torch.tensor(250), ctx, y)
    network = build(unet, targets="to_q,to_out,ff")
    assert network.config.base_model == "SDXL"
    names = set(network.layers)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2" in names
    assert len(names) == 3 * (2 * 2 + 2)
    assert torch.equal(unet(x, torch.tensor(250), ctx, y), expected)  # scalar t broadcast to the batch
    perturb(network)
    positional = unet(x, torch.tensor([250, 250]), ctx, y)
    keyword = unet(x, timesteps=torch.tensor([250, 250]), context=ctx, y=y)
    assert torch.equal(positional, keyword) and not torch.equal(positional, expected)
    network.save_weights(str(tmp_path / "xl.safetensors"), torch.bfloat16, {})
    _, meta = read_safetensors(tmp_path / "xl.safetensors")
    assert meta["tlora.storage"] == "bf16" and json.loads(meta["tlora.config"])["base_model"] == "SDXL"


class InferWrapper:
    """Like sd-scripts' InferUNet2DConditionModel (gen_img.py): not a Module, delegates attributes and calls."""

    def __init__(self, unet):
        self.delegate = unet

    def __getattr__(self, name):
        return getattr(self.delegate, name)

    def __call__(self, *args, **kwargs):
        return self.delegate(*args, **kwargs)


def test_gen_img_sequence_on_a_wrapped_unet(tmp_path):
    """gen_img.py: create_network_from_weights(for_inference=True), is_mergeable, apply_to, load_state_dict."""
    unet = make_unet()
    network = build(unet)
    perturb(network)
    network.save_weights(str(tmp_path / "t.safetensors"), None, {})
    x, ctx = batch(4)
    t = torch.tensor(321)  # one scalar t for a CFG-doubled batch
    expected = unet(x, t, ctx).sample
    wrapped = InferWrapper(make_unet())
    net2, weights_sd = kohya.create_network_from_weights(1.0, str(tmp_path / "t.safetensors"), None, [None], wrapped,
                                                         for_inference=True)
    assert not net2.is_mergeable()
    net2.apply_to([None], wrapped)
    net2.load_state_dict(weights_sd, False)  # gen_img does this; the keys differ, so nothing changes
    assert torch.equal(wrapped(x, t, ctx).sample, expected)


@pytest.mark.parametrize("variant, svd_on", [("tlora", torch.device("cuda", 1)), ("vanilla_tlora", None)])
def test_ortho_svds_run_on_the_current_gpu_and_factors_stay_beside_the_model(monkeypatch, variant, svd_on):
    """sd-scripts creates the network while the model is still on the CPU; accelerate has made each process's
    GPU the current one, so the SVDs go there (only the ortho variants have any) and the factors come back."""
    asked = []
    real = kohya.init_factors

    def recording(*args, device=None):
        asked.append(device)
        return real(*args)  # on the CPU: this machine has no GPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(kohya, "init_factors", recording)
    network = build(make_unet(), variant)
    assert asked == [svd_on] * len(network.layers)
    assert {p.device.type for p in network.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_ortho_init_on_a_gpu_gives_orthonormal_factors_on_the_models_device():
    unet = make_unet()
    network = build(unet)
    assert {p.device.type for p in network.parameters()} == {"cpu"}
    a = next(iter(network.layers.values()))
    torch.testing.assert_close(a.down @ a.down.T, torch.eye(RANK), atol=1e-6, rtol=0)
    unet.cuda()
    on_gpu = build(unet)
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}


def test_save_replaces_an_existing_file_atomically(tmp_path):
    network = build(make_unet())
    path = tmp_path / "last.safetensors"
    path.write_bytes(b"old")
    network.save_weights(str(path), torch.float16, {"ss_steps": "10"})
    assert load_tlora(path).config.training["ss_steps"] == "10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]


def test_optimizer_params_hold_only_the_trainable_factors():
    network = build(make_unet())
    groups, _ = network.prepare_optimizer_params(None, None, 1e-4)
    params = groups[0]["params"]
    assert groups[0]["lr"] == 1e-4
    assert len(params) == 3 * len(network.layers)  # down, up, scale
    assert {id(p) for p in params} == {id(p) for p in network.get_trainable_params()}
    assert not network.is_mergeable()
    vanilla = build(make_unet(), "lora")
    assert len(vanilla.prepare_optimizer_params(None, None, 1e-4)[0][0]["params"]) == 2 * len(vanilla.layers)
    assert len(list(vanilla.buffers())) == 0


@pytest.mark.parametrize("args, error", [
    ({"conv_dim": "4"}, TLoraConfigError),
    ({"variant": "dora"}, TLoraConfigError),
    ({"targets": "to_q,proj_in"}, TLoraConfigError),
    ({"min_rank": "9"}, TLoraConfigError),
    ({"min_rank": "four"}, TLoraConfigError),
])
def test_bad_network_args_fail_loudly(args, error):
    with pytest.raises(error):
        build(make_unet(), **args)


def test_unsupported_uses_fail_loudly(tmp_path):
    unet = make_unet()
    with pytest.raises(TLoraConfigError, match="dropout"):
        kohya.create_network(1.0, RANK, 1.0, None, None, unet, neuron_dropout=0.1, dropout=0.1)
    network = kohya.create_network(1.0, RANK, 1.0, None, None, unet, min_rank="4")
    with pytest.raises(TLoraConfigError, match="save_model_as"):
        network.prepare_network(Namespace(save_model_as="ckpt"))
    with pytest.raises(TLoraConfigError, match="text_encoder_only"):
        network.apply_to(None, unet, True, False)
    network.apply_to(None, unet, True, True)
    with pytest.raises(TLoraError, match="outside a UNet call"):
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q(torch.randn(1, 2, DIM))
    with pytest.raises(TLoraError, match="merged"):
        network.merge_to(None, unet, {}, torch.float32, "cpu")
    network.save_weights(str(tmp_path / "a.safetensors"), None, None)
    with pytest.raises(TLoraFormatError, match="rank"):
        other_rank = kohya.create_network(1.0, 4, 1.0, None, None, make_unet(), min_rank="2")
        other_rank.load_weights(str(tmp_path / "a.safetensors"))
    with pytest.raises(TLoraFormatError, match="not Linear layers"):
        kohya.create_network_from_weights(1, str(tmp_path / "a.safetensors"), None, None, SdxlUNet2DConditionModel())


def _run(code, cwd, env_path):
    env = {**os.environ, "PYTHONPATH": env_path}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_module_imports_with_only_the_pack_root_on_the_path_and_pulls_in_no_comfy(tmp_path):
    code = (
        "import sys, torch, safetensors.torch\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import tlora_core.kohya as k\n"
        "new = {m.split('.')[0] for m in sys.modules} - before\n"
        "extra = sorted(new - set(sys.stdlib_module_names) - {'tlora_core'})\n"
        "assert not extra, extra\n"
        "assert not any(m.split('.')[0].startswith('comfy') for m in sys.modules)\n"
        "assert callable(k.create_network) and callable(k.create_network_from_weights)\n"
        "print('ok')\n")
    result = _run(code, tmp_path, str(ROOT))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_layer_keys_are_in_comfyui_lora_key_maps(tmp_path):
    from support.comfy_env import comfyui_dir  # the host the suite runs on: $TLORA_COMFYUI_DIR or .deps/ComfyUI

    comfy_dir = comfyui_dir()
    if not (comfy_dir / "comfy" / "utils.py").is_file():
        pytest.skip(f"ComfyUI not found at {comfy_dir} (run scripts/setup_env.sh or set TLORA_COMFYUI_DIR)")
    sd15 = sorted(build(make_unet(), targets="to_q,to_k,to_v,to_out,ff").layers)
    torch.manual_seed(0)
    sdxl = sorted(build(SdxlUNet2DConditionModel(), targets="to_q,to_k,to_v,to_out,ff").layers)
    code = (
        "import json, sys, comfy.utils as u\n"
        "keys = json.loads(sys.argv[1])\n"
        "def lora(ks): return {'lora_unet_' + k[:-7].replace('.', '_') for k in ks if k.endswith('.weight')}\n"
        "sd15 = dict(num_res_blocks=[2]*4, channel_mult=[1,2,4,4], transformer_depth=[1,1,1,1,1,1,0,0],\n"
        "            transformer_depth_output=[1]*9 + [0]*3, transformer_depth_middle=1)\n"
        "sdxl = dict(num_res_blocks=[2]*3, channel_mult=[1,2,4], transformer_depth=[0,0,2,2,10,10],\n"
        "            transformer_depth_output=[0,0,0,2,2,2,10,10,10], transformer_depth_middle=10)\n"
        "m15 = u.unet_to_diffusers(sd15); mxl = u.unet_to_diffusers(sdxl)\n"
        "miss = sorted(set(keys['sd15']) - lora(m15)) + sorted(set(keys['sdxl']) - lora(mxl.values()))\n"
        "print(json.dumps(miss))\n")
    env = {**os.environ, "PYTHONPATH": str(comfy_dir)}
    result = subprocess.run([sys.executable, "-c", code, json.dumps({"sd15": sd15, "sdxl": sdxl})], cwd=comfy_dir,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
