"""Export to a standard LoRA: the written factors against dW built by hand (B diag(S·m) A − B0 diag(S0·m) A0),
the SVD error against a dense SVD done here, and the file through ComfyUI's own LoRA loader."""
import json

import pytest
import torch
from safetensors import safe_open

from tlora_pack.tlora_core import export, readers
from tlora_pack.tlora_core.adapter import LayerFactors
from tlora_pack.tlora_core.config import TLoraConfig
from tlora_pack.tlora_core.errors import TLoraError, TLoraFormatError
from tlora_pack.tlora_core.format import TLora
from tlora_pack.tlora_core.init import ortho_factors, vanilla_factors

RANK, MIN_RANK = 6, 2
SHAPES = {"diffusion_model.a.attn1.to_q": (20, 16), "diffusion_model.a.attn2.to_k": (20, 12),
          "diffusion_model.b.attn1.to_out.0": (24, 24)}
VARIANTS = ["tlora", "vanilla_tlora", "ortho_lora", "lora"]


def trained(variant="tlora", seed=0, rank=RANK, shapes=SHAPES):
    """A T-LoRA moved away from its init (so dW != 0), like a few training steps would."""
    config = TLoraConfig(rank=rank, min_rank=min(MIN_RANK, rank), variant=variant)
    gen = torch.Generator().manual_seed(seed + 7)
    layers = {}
    for key, (n_out, n_in) in shapes.items():
        make = ortho_factors if config.ortho else vanilla_factors
        f = make(n_in, n_out, rank, seed=seed, layer_key=key)
        f.down = f.down + 0.1 * torch.randn(f.down.shape, generator=gen)
        f.up = f.up + 0.1 * torch.randn(f.up.shape, generator=gen)
        if f.scale is not None:
            f.scale = f.scale + 0.2 * torch.rand(f.scale.shape, generator=gen)
        layers[key] = f
    return TLora(config, layers)


def hand_dw(f: LayerFactors, keep: int) -> torch.Tensor:
    """Eq. 6 in float64 with the first `keep` components."""
    def part(down, up, scale):
        g = torch.ones(down.shape[0], dtype=torch.float64) if scale is None else scale.double().clone()
        g[keep:] = 0
        return (up.double() * g) @ down.double()
    dw = part(f.down, f.up, f.scale)
    if f.base_down is not None:
        dw = dw - part(f.base_down, f.base_up, f.base_scale)
    return dw


def loaded_delta(sd, key):
    """What a kohya-style loader adds: alpha / rank · up @ down."""
    up, down = sd[f"{key}.lora_up.weight"].double(), sd[f"{key}.lora_down.weight"].double()
    return float(sd[f"{key}.alpha"]) / down.shape[0] * (up @ down)


def paper_rank(t, rank=RANK, min_rank=MIN_RANK):
    return (rank - min_rank) * (1000 - t) // 1000 + min_rank


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_export_equals_dw_at_t0_in_fp32(variant):
    tlora = trained(variant)
    sd, report = export.export_standard_lora(tlora, timestep=0, storage="fp32")
    for key, f in tlora.layers.items():
        assert rel(loaded_delta(sd, key), hand_dw(f, RANK)) < 1e-6
        assert sd[f"{key}.lora_down.weight"].shape[0] == (2 * RANK if tlora.config.ortho else RANK)
        assert float(sd[f"{key}.alpha"]) == sd[f"{key}.lora_down.weight"].shape[0]
    assert report.mode == "exact" and report.kept == RANK and report.overall_error < 1e-6
    assert set(sd) == {f"{k}.{n}" for k in SHAPES for n in ("lora_up.weight", "lora_down.weight", "alpha")}


@pytest.mark.parametrize("t", [500, 999])
def test_exact_export_at_a_later_timestep_keeps_only_the_masked_components(t):
    tlora = trained("tlora")
    keep = paper_rank(t)
    sd, report = export.export_standard_lora(tlora, timestep=t, storage="fp32")
    assert report.kept == keep and report.timestep == t
    for key, f in tlora.layers.items():
        assert sd[f"{key}.lora_down.weight"].shape[0] == 2 * keep
        assert rel(loaded_delta(sd, key), hand_dw(f, keep)) < 1e-6


def test_unmasked_variants_export_full_rank_at_any_timestep():
    tlora = trained("ortho_lora")
    sd, report = export.export_standard_lora(tlora, timestep=999, storage="fp32")
    assert report.kept == RANK
    key = next(iter(SHAPES))
    assert rel(loaded_delta(sd, key), hand_dw(tlora.layers[key], RANK)) < 1e-6


def test_an_explicit_mask_row_is_used_as_given():
    tlora = trained("tlora")
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    sd, report = export.export_standard_lora(tlora, mask=mask, storage="fp32")
    assert report.kept == 3 and report.timestep is None
    for key, f in tlora.layers.items():
        assert rel(loaded_delta(sd, key), hand_dw(f, 3)) < 1e-6


def dense_tail(dw, k):
    """Relative Frobenius error of the best rank-k approximation, from a dense SVD done here."""
    s = torch.linalg.svdvals(dw)
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def test_svd_export_error_decreases_with_rank_and_is_reported_truthfully():
    tlora = trained("tlora")
    hand = {key: hand_dw(f, RANK) for key, f in tlora.layers.items()}
    previous = float("inf")
    for k in (1, 2, 4, 8):
        sd, report = export.export_standard_lora(tlora, rank=k, storage="fp32")
        assert report.mode == "svd" and report.requested_rank == k
        err2 = norm2 = 0.0
        for key, dw in hand.items():
            measured = rel(loaded_delta(sd, key), dw)
            assert sd[f"{key}.lora_down.weight"].shape[0] == k
            assert report.layer_errors[key] == pytest.approx(measured, abs=1e-6)
            assert report.layer_errors[key] == pytest.approx(dense_tail(dw, k), abs=1e-6)
            err2, norm2 = err2 + (measured * dw.norm()) ** 2, norm2 + dw.norm() ** 2
        assert report.overall_error == pytest.approx(float((err2 / norm2) ** 0.5), abs=1e-6)
        assert report.overall_error < previous
        previous = report.overall_error
    assert previous > 0.0  # rank 8 < the exact 2r = 12 still loses something


def test_svd_export_at_the_exact_rank_or_above_loses_nothing_but_rounding():
    tlora = trained("tlora")
    sd, report = export.export_standard_lora(tlora, rank=2 * RANK + 5, storage="fp32")
    assert report.overall_error < 1e-6
    for key, f in tlora.layers.items():
        assert sd[f"{key}.lora_down.weight"].shape[0] == 2 * RANK
        assert rel(loaded_delta(sd, key), hand_dw(f, RANK)) < 1e-6


def test_fp16_storage_error_is_measured_on_the_stored_tensors():
    tlora = trained("tlora")
    sd, report = export.export_standard_lora(tlora, storage="fp16")
    assert all(t.dtype == torch.float16 for t in sd.values())
    for key, f in tlora.layers.items():
        measured = rel(loaded_delta(sd, key), hand_dw(f, RANK))
        assert 0 < measured < 1e-2
        assert report.layer_errors[key] == pytest.approx(measured, rel=1e-3)


def test_literal_exact_form_is_the_trained_half_beside_the_negated_frozen_half():
    tlora = trained("tlora")
    keep = paper_rank(500)
    sd, _ = export.export_standard_lora(tlora, timestep=500, storage="fp32", refactor=False)
    for key, f in tlora.layers.items():
        g, g0 = f.scale[:keep], f.base_scale[:keep]
        want_up = torch.cat([f.up[:, :keep] * g, -(f.base_up[:, :keep] * g0)], dim=1)
        want_down = torch.cat([f.down[:keep], f.base_down[:keep]], dim=0)
        torch.testing.assert_close(sd[f"{key}.lora_up.weight"], want_up, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sd[f"{key}.lora_down.weight"], want_down, rtol=1e-6, atol=1e-7)


def test_refactored_export_survives_half_precision_better_than_the_literal_form():
    tlora = trained("tlora")
    for f in tlora.layers.values():  # a small update on top of large factors, as after real training
        f.down, f.up = f.base_down + 0.01 * (f.down - f.base_down), f.base_up + 0.01 * (f.up - f.base_up)
    for storage in ("fp16", "bf16"):
        _, literal = export.export_standard_lora(tlora, storage=storage, refactor=False)
        _, refactored = export.export_standard_lora(tlora, storage=storage)
        assert refactored.overall_error < literal.overall_error / 3
        assert refactored.overall_error < (1e-3 if storage == "fp16" else 8e-3)


def test_save_standard_lora_records_its_origin_and_never_overwrites(tmp_path):
    tlora = trained("tlora")
    path, report = export.save_standard_lora(tlora, tmp_path / "frozen.safetensors", rank=4, timestep=250)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    assert "tlora.format" not in meta
    assert json.loads(meta["tlora.exported_from"])["variant"] == "tlora"
    info = json.loads(meta["tlora.export"])
    assert (info["mode"], info["timestep"], info["requested_rank"], info["storage"]) == ("svd", 250, 4, "fp16")
    assert info["overall_error"] == pytest.approx(report.overall_error)
    assert "t = 250" in report.summary() and "svd" in report.summary()
    assert set(stored) == {f"{k}.{n}" for k in SHAPES for n in ("lora_up.weight", "lora_down.weight", "alpha")}
    before = path.read_bytes()
    with pytest.raises(TLoraError, match="never overwritten"):
        export.save_standard_lora(trained("tlora", seed=3), path)
    assert path.read_bytes() == before
    with pytest.raises(TLoraFormatError, match="ordinary LoRA"):
        readers.read_any(path)


def test_an_untrained_tlora_has_nothing_to_export():
    config = TLoraConfig(rank=4, min_rank=2)
    untouched = TLora(config, {"diffusion_model.x": ortho_factors(8, 8, 4, seed=0, layer_key="x")})
    with pytest.raises(TLoraError, match="nothing to export"):
        export.export_standard_lora(untouched)


@pytest.mark.parametrize("kwargs,needle", [({"rank": 0}, "0"), ({"rank": 2.5}, "2.5"), ({"storage": "int8"}, "int8")])
def test_bad_export_settings_are_refused_naming_the_value(kwargs, needle):
    with pytest.raises(TLoraError) as err:
        export.export_standard_lora(trained("tlora"), **kwargs)
    assert needle in str(err.value)


# ---- through ComfyUI's stock LoRA loader ---------------------------------------------------------------

def _reference_checkpoint_for(model, tmp_path, rank=4, seed=0):
    """A reference-layout (ControlGenAI/T-LoRA) ortho checkpoint for every attention projection of a real
    ComfyUI UNet, named by the diffusers paths ComfyUI itself derives for that UNet."""
    import re

    import comfy.utils
    from support import reference_files as ref

    gen = torch.Generator().manual_seed(seed)
    state, targets = {}, {}
    for dkey, ldm in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items():
        m = re.match(r"^(.+\.attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?\.weight$", dkey)
        if m is None:
            continue
        n_out, n_in = model.diffusion_model.get_submodule(ldm[: -len(".weight")]).weight.shape
        prefix = f"{m[1]}.processor.{m[2]}_lora"
        state.update(ref.ortho_tensors(prefix, n_in, n_out, rank, gen))
        targets[f"{m[1]}.processor.{m[2]}"] = f"diffusion_model.{ldm}"
    return ref.write_sdxl_checkpoint(tmp_path, state), targets


def _within_rounding(got, want, dw):
    """got equals want up to rounding: of the weight's dtype (ComfyUI adds in fp32, then casts) and of ComfyUI's
    fp32 up @ down against the test's float64 dW (a few fp32 units of the largest |dW|)."""
    eps = torch.finfo(want.dtype).eps
    tolerance = 2 * eps * want.float().abs() + 1e-5 * float(dw.abs().max())
    return bool(((got.float() - want.float()).abs() <= tolerance).all())


@pytest.mark.parametrize("t", [500])
def test_exported_lora_through_comfyuis_stock_loader_changes_the_weights_by_exactly_dw(comfy, tiny_sd15, tmp_path, t):
    import comfy.lora
    import comfy.sd

    patcher = tiny_sd15[0]
    model = patcher.model
    path, targets = _reference_checkpoint_for(model, tmp_path)
    tlora = readers.read_reference_sdxl(path, base_model="SD15", min_rank=2)
    lora_path, report = export.save_standard_lora(tlora, tmp_path / "exported.safetensors", timestep=t,
                                                  storage="fp32")
    with safe_open(str(lora_path), framework="pt") as fh:
        lora = {k: fh.get_tensor(k) for k in fh.keys()}

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    assert set(patches) == set(targets.values()), "every exported layer must resolve to a model weight"

    keep = (4 - 2) * (1000 - t) // 1000 + 2
    want = {targets[key]: hand_dw(f, keep).float() for key, f in tlora.layers.items()}
    sd_before = model.state_dict()
    before = {k: sd_before[k].detach().clone() for k in want}
    with_lora, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    with_lora.patch_model()
    try:
        after = {k: v.detach().clone() for k, v in with_lora.model.state_dict().items() if k in want}
    finally:
        with_lora.unpatch_model()
    for k, dw in want.items():
        # ComfyUI's own patch maths on a zero fp32 weight: the update it adds, free of the model's dtype
        added = comfy.lora.calculate_weight(with_lora.patches[k], torch.zeros(dw.shape), k)
        assert rel(added.double(), dw.double()) < 1e-6, k
        expected = (before[k].float() + dw).to(before[k].dtype)
        assert _within_rounding(after[k], expected, dw), k
        assert not torch.equal(after[k], before[k])
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in want), "unpatch restores the model"
    assert report.overall_error < 1e-6
