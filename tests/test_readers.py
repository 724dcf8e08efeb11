"""Readers of other implementations' files: written here from their documented layouts, compared with their
forward formulas computed by hand (tests/support/reference_files.py), never with the pack's own maths."""
import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import save_file

from support import reference_files as ref
from tlora_pack.tlora_core import readers
from tlora_pack.tlora_core.adapter import delta_weight
from tlora_pack.tlora_core.config import TLoraConfig
from tlora_pack.tlora_core.errors import TLoraFormatError
from tlora_pack.tlora_core.format import TLora, save_tlora
from tlora_pack.tlora_core.init import ortho_factors
from tlora_pack.tlora_core.schedule import rank_masks

RANK, MIN_RANK, ALPHA_RANK_SCALE = 8, 2, 1.5
PROCS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
         "up_blocks.0.attentions.2.transformer_blocks.1.attn2.processor"]
SDXL_HPARAMS = {"lora_rank": RANK, "min_rank": MIN_RANK, "alpha_rank_scale": ALPHA_RANK_SCALE,
                "sig_type": "last", "trainer_type": "ortho_lora", "trainer_class": "sdxl_tlora",
                "placeholder_token": "sks", "class_name": "dog"}


def pack_mask(tlora, t):
    """The pack's own mask at t for this T-LoRA's settings (schedule.py, tested on its own elsewhere)."""
    c = tlora.config
    return rank_masks(torch.tensor([float(t)]), c.rank, c.schedule_min_rank, c.exponent)[0]


def x_for(n_in, seed=0):
    return torch.randn(3, 5, n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def relative(a, b):
    return float((a - b).norm() / b.norm())


# ---- reference SD-XL ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0, 1, 333, 500, 750, 999])
def test_reference_ortho_checkpoint_reproduces_the_reference_forward_at_every_t(tmp_path, t):
    state = ref.sdxl_state(PROCS, RANK, ortho=True)
    tlora = readers.read_reference_sdxl(ref.write_sdxl_checkpoint(tmp_path, state, SDXL_HPARAMS))
    want_mask = ref.prefix(ref.reference_sdxl_rank(t, RANK, MIN_RANK, ALPHA_RANK_SCALE), RANK).double()
    assert len(tlora.layers) == 8
    for proc in PROCS:
        for proj, n_in, _ in ref.attention_shapes(proc, 16, 12):
            x = x_for(n_in)
            want = ref.ortho_forward(x, state, f"{proc}.{proj}_lora", want_mask)
            got = x @ delta_weight(tlora.layers[f"{proc}.{proj}"], pack_mask(tlora, t), dtype=torch.float64).T
            assert relative(got, want) < 1e-6


@pytest.mark.parametrize("t", [0, 400, 999])
def test_reference_vanilla_checkpoint_reproduces_the_reference_forward(tmp_path, t):
    state = ref.sdxl_state(PROCS, RANK, ortho=False)
    hp = {**SDXL_HPARAMS, "trainer_type": "lora"}
    tlora = readers.read_reference_sdxl(ref.write_sdxl_checkpoint(tmp_path, state, hp))
    assert tlora.config.variant == "vanilla_tlora" and not tlora.layers[f"{PROCS[0]}.to_q"].has_base
    mask = ref.prefix(ref.reference_sdxl_rank(t, RANK, MIN_RANK, ALPHA_RANK_SCALE), RANK).double()
    key = f"{PROCS[1]}.to_k"
    x = x_for(12)
    want = ref.vanilla_forward(x, state, f"{PROCS[1]}.to_k_lora", mask)
    got = x @ delta_weight(tlora.layers[key], pack_mask(tlora, t), dtype=torch.float64).T
    assert relative(got, want) < 1e-6


def test_reference_layer_keys_are_the_processor_paths_comfyui_maps(tmp_path):
    tlora = readers.read_reference_sdxl(ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(PROCS, RANK, True)))
    assert f"{PROCS[0]}.to_out" in tlora.layers and f"{PROCS[0]}.to_q" in tlora.layers
    assert all(key.endswith((".processor.to_q", ".processor.to_k", ".processor.to_v", ".processor.to_out"))
               for key in tlora.layers)


def test_hparams_in_logs_beside_the_checkpoints_set_the_schedule_and_the_secret_is_never_kept(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(PROCS, RANK, True), SDXL_HPARAMS)
    tlora = readers.read_reference_sdxl(path)
    c = tlora.config
    assert (c.rank, c.min_rank, c.exponent, c.variant) == (RANK, MIN_RANK, ALPHA_RANK_SCALE, "tlora")
    assert (c.trigger, c.class_word, c.init, c.base_model) == ("sks", "dog", "last", "SDXL")
    assert c.training["schedule_from"] == "hparams.yml"
    assert ref.SECRET not in c.to_json() and "private" not in c.to_json()
    assert ref.SECRET not in caplog.text
    assert ref.SECRET not in repr(readers.read_hparams(tmp_path / "logs" / "hparams.yml"))


def test_hparams_beside_the_weights_or_given_explicitly_are_used(tmp_path):
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(PROCS, RANK, True))
    ref.write_hparams(path.parent / "hparams.yml", {**SDXL_HPARAMS, "min_rank": 3})
    assert readers.read_reference_sdxl(path).config.min_rank == 3
    other = ref.write_hparams(tmp_path / "elsewhere" / "hparams.yml", {**SDXL_HPARAMS, "min_rank": 5})
    assert readers.read_reference_sdxl(path, hparams=other).config.min_rank == 5
    assert readers.read_reference_sdxl(path, hparams=other.parent).config.min_rank == 5


def test_without_hparams_r_min_is_half_the_rank_and_arguments_override_the_file(tmp_path, caplog):
    path = ref.write_sdxl_checkpoint(tmp_path / "a", ref.sdxl_state(PROCS, RANK, True))
    c = readers.read_reference_sdxl(path).config
    assert (c.min_rank, c.exponent) == (RANK // 2, 1.0) and f"r_min = {RANK // 2}" in c.training["schedule_from"]
    assert f"guessed r_min = {RANK // 2}" in caplog.text and "exponent 1" in caplog.text and "SD-XL" in caplog.text
    path = ref.write_sdxl_checkpoint(tmp_path / "b", ref.sdxl_state(PROCS, RANK, True), SDXL_HPARAMS)
    c = readers.read_reference_sdxl(path, min_rank=6, exponent=2.0).config
    assert (c.min_rank, c.exponent, c.training["schedule_from"]) == (6, 2.0, "argument")


def test_hparams_of_another_run_are_refused_naming_both_files(tmp_path):
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(PROCS, RANK, True), {**SDXL_HPARAMS, "lora_rank": 32})
    with pytest.raises(TLoraFormatError) as err:
        readers.read_reference_sdxl(path)
    assert "hparams.yml" in str(err.value) and str(path) in str(err.value) and "32" in str(err.value)


def test_broken_hparams_error_shows_no_line_of_the_file(tmp_path):
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(PROCS, RANK, True))
    (path.parent / "hparams.yml").write_text(f"min_rank: 2\nwandb_api_key: [{ref.SECRET}\n", encoding="utf-8")
    with pytest.raises(TLoraFormatError) as err:
        readers.read_reference_sdxl(path)
    assert ref.SECRET not in str(err.value) and "hparams.yml" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_python_tags_in_hparams_do_not_stop_the_read(tmp_path):
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(PROCS, RANK, True))
    (path.parent / "hparams.yml").write_text("min_rank: 3\nresolution: !!python/tuple [1024, 1024]\n")
    assert readers.read_reference_sdxl(path).config.min_rank == 3


def test_their_plain_lora_trainer_class_reads_as_full_rank_variants(tmp_path):
    hp = {**SDXL_HPARAMS, "trainer_class": "sdxl_lora"}
    ortho = readers.read_reference_sdxl(ref.write_sdxl_checkpoint(tmp_path / "o", ref.sdxl_state(PROCS, RANK, True), hp))
    vanilla = readers.read_reference_sdxl(
        ref.write_sdxl_checkpoint(tmp_path / "v", ref.sdxl_state(PROCS, RANK, False), hp))
    assert (ortho.config.variant, vanilla.config.variant) == ("ortho_lora", "lora")
    assert int(pack_mask(ortho, 999).sum()) == RANK


def test_reference_file_missing_a_frozen_copy_is_refused_naming_the_layer(tmp_path):
    state = ref.sdxl_state(PROCS[:1], RANK, True)
    del state[f"{PROCS[0]}.to_v_lora.base_lambda"]
    with pytest.raises(TLoraFormatError) as err:
        readers.read_reference_sdxl(ref.write_sdxl_checkpoint(tmp_path, state))
    assert f"{PROCS[0]}.to_v" in str(err.value) and "base_scale" in str(err.value)


# ---- reference FLUX ---------------------------------------------------------------------------------

FLUX_HPARAMS = {"rank": RANK, "min_rank": 3, "tlora": True, "placeholder_token": "sks"}


def test_flux_lora_pt_is_loaded_with_weights_only_and_keys_follow_comfyui_flux_names(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state = ref.flux_state(double_blocks=1, single_blocks=1, hidden=16, rank=RANK)
    tlora = readers.read_reference_flux(ref.write_flux_checkpoint(tmp_path, state, FLUX_HPARAMS))
    assert calls and all(c.get("weights_only") is True and str(c.get("map_location")) == "cpu" for c in calls)
    expected = {f"transformer.transformer_blocks.0.attn.{n}"
                for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")}
    expected |= {f"transformer.single_transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")}
    assert set(tlora.layers) == expected
    c = tlora.config
    assert (c.variant, c.base_model, c.min_rank, c.exponent, c.trigger) == ("vanilla_tlora", "Flux", 3, 1.0, "sks")


@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5, 0.999])
def test_flux_dw_matches_their_forward_with_t_equal_1000_sigma(tmp_path, sigma):
    state = ref.flux_state(double_blocks=1, single_blocks=0, hidden=16, rank=RANK)
    tlora = readers.read_reference_flux(ref.write_flux_checkpoint(tmp_path, state, FLUX_HPARAMS))
    t = 1000 * sigma
    mask = ref.prefix(ref.reference_flux_rank(t, RANK, 3), RANK).double()
    x = x_for(16)
    want = ref.vanilla_forward(x, state, "transformer_blocks.0.attn.processor.to_q_proj_lora", mask)
    got = x @ delta_weight(tlora.layers["transformer.transformer_blocks.0.attn.add_q_proj"],
                           pack_mask(tlora, t), dtype=torch.float64).T
    assert relative(got, want) < 1e-6


@pytest.mark.parametrize("rank, guessed", [(32, 1), (64, 2), (8, 1)])
def test_flux_file_without_hparams_gets_the_reference_flux_recipe_with_a_warning(tmp_path, caplog, rank, guessed):
    """The reference FLUX recipe trains rank 32 with r_min 1: without hparams.yml that proportion is used."""
    state = ref.flux_state(double_blocks=1, single_blocks=0, hidden=64, rank=rank)
    c = readers.read_reference_flux(ref.write_flux_checkpoint(tmp_path, state)).config
    assert (c.rank, c.min_rank, c.variant, c.family) == (rank, guessed, "vanilla_tlora", "Flux")
    assert f"guessed r_min = {guessed}" in caplog.text and "Flux" in caplog.text


@pytest.mark.parametrize("context, base, family", [(768, "SD15", "SD1.x"), (1024, "SD20", "SD2.x"),
                                                   (2048, "SDXL", "SD-XL")])
def test_reference_layout_unet_files_name_their_model_by_the_text_width(tmp_path, context, base, family):
    procs = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(procs, RANK, True, context=context), SDXL_HPARAMS)
    c = readers.read_any(path).config
    assert (c.base_model, c.family) == (base, family)


def test_flux_run_without_tlora_flag_reads_as_plain_lora(tmp_path):
    state = ref.flux_state(double_blocks=1, single_blocks=0, hidden=16, rank=RANK)
    path = ref.write_flux_checkpoint(tmp_path, state, {**FLUX_HPARAMS, "tlora": False})
    assert readers.read_reference_flux(path).config.variant == "lora"


class _Payload:
    pass


def test_torch_file_holding_python_objects_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "checkpoint-1" / "lora.pt"
    path.parent.mkdir()
    torch.save({"transformer_blocks.0.attn.processor.to_q_lora.down.weight": torch.zeros(2, 4), "x": _Payload()},
               str(path))
    with pytest.raises(TLoraFormatError) as err:
        readers.read_any(path)
    assert str(path) in str(err.value) and "never unpickled" in str(err.value)


# ---- LyCORIS ----------------------------------------------------------------------------------------

LYCO_NAMES = {"lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (24, 16),
              "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (24, 12)}


def lyco_weights(seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in LYCO_NAMES.items()}


def lyco_forward(x, state, frozen, name, mask, rank):
    """alpha/r * (P(Q(x)·λ·m) − P0(Q0(x)·λ0·m)): LyCORIS TLoraModule's bypass forward, by hand."""
    d = lambda t: t.double()  # noqa: E731
    q0, p0, lam0 = (d(t) for t in frozen[name])
    scale = float(state[f"{name}.alpha"]) / rank
    trained = (x @ d(state[f"{name}.q_layer.weight"]).T) * d(state[f"{name}.lambda_layer"]) * mask
    trained = trained @ d(state[f"{name}.p_layer.weight"]).T
    base = ((x @ q0.T) * lam0 * mask) @ p0.T
    return scale * (trained - base)


def write_lycoris(tmp_path, state):
    path = tmp_path / "lycoris_tlora.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("as_callable", [False, True])
@pytest.mark.parametrize("t", [0, 600])
def test_lycoris_file_with_base_weights_rebuilds_the_frozen_factors_and_matches_its_forward(tmp_path, as_callable, t):
    weights = lyco_weights()
    state, frozen = ref.lycoris_state(weights, rank=4, alpha=2.0)
    base = weights.get if as_callable else weights
    tlora = readers.read_lycoris(write_lycoris(tmp_path, state), base_weights=base, min_rank=2)
    assert tlora.config.variant == "tlora" and tlora.config.source == readers.FORMAT_LYCORIS
    mask = ref.prefix(ref.reference_sdxl_rank(t, 4, 2), 4).double()
    for name, (n_out, n_in) in LYCO_NAMES.items():
        x = x_for(n_in)
        want = lyco_forward(x, state, frozen, name, mask, 4)
        got = x @ delta_weight(tlora.layers[name], pack_mask(tlora, t), dtype=torch.float64).T
        assert relative(got, want) < 1e-5


def test_lycoris_rebuild_follows_the_requested_singular_slice(tmp_path):
    weights = lyco_weights()
    state, frozen = ref.lycoris_state(weights, rank=4, alpha=4.0, sig_type="last")
    tlora = readers.read_lycoris(write_lycoris(tmp_path, state), base_weights=weights, sig_type="last")
    name = next(iter(LYCO_NAMES))
    x = x_for(LYCO_NAMES[name][1])
    want = lyco_forward(x, state, frozen, name, torch.ones(1, 4, dtype=torch.float64), 4)
    assert relative(x @ delta_weight(tlora.layers[name], dtype=torch.float64).T, want) < 1e-5


def test_lycoris_file_without_base_weights_says_what_cannot_be_rebuilt(tmp_path):
    state, _ = ref.lycoris_state(lyco_weights(), rank=4, alpha=2.0)
    path = write_lycoris(tmp_path, state)
    with pytest.raises(readers.MissingBaseWeightsError) as err:
        readers.read_any(path)
    text = str(err.value)
    assert str(path) in text and "SVD of the base model's weights" in text and "loader node" in text
    assert sorted(err.value.layer_keys) == sorted(LYCO_NAMES)
    assert isinstance(err.value, TLoraFormatError)


def test_lycoris_base_weight_missing_for_one_layer_names_that_layer(tmp_path):
    weights = lyco_weights()
    state, _ = ref.lycoris_state(weights, rank=4, alpha=2.0)
    first, second = LYCO_NAMES
    with pytest.raises(readers.MissingBaseWeightsError) as err:
        readers.read_lycoris(write_lycoris(tmp_path, state), base_weights={first: weights[first]})
    assert second in str(err.value) and err.value.layer_keys == [second]


def test_lycoris_alpha_zero_means_scale_one_as_in_lycoris(tmp_path):
    weights = lyco_weights()
    state, _ = ref.lycoris_state(weights, rank=4, alpha=0.0)
    tlora = readers.read_lycoris(write_lycoris(tmp_path, state), base_weights=weights)
    name = next(iter(LYCO_NAMES))
    torch.testing.assert_close(tlora.layers[name].scale, state[f"{name}.lambda_layer"][0])


# ---- sniffing and refusals ---------------------------------------------------------------------------

def test_ordinary_lora_is_refused_and_pointed_at_loraloader(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 16),
               "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(16, 4),
               "lora_unet_down_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)}, str(path))
    with pytest.raises(TLoraFormatError) as err:
        readers.read_any(path)
    text = str(err.value)
    assert "ordinary LoRA" in text and "LoraLoader" in text and str(path) in text and "lora_unet_" in text


def test_unknown_and_truncated_files_are_refused_naming_the_file(tmp_path):
    odd = tmp_path / "odd.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(odd))
    with pytest.raises(TLoraFormatError, match="some.weight"):
        readers.read_any(odd)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(odd.read_bytes()[:20])
    with pytest.raises(TLoraFormatError, match="cut.safetensors"):
        readers.read_any(cut)


def test_a_safetensors_header_length_that_looks_like_a_pickle_is_still_read_as_safetensors(tmp_path):
    state = ref.sdxl_state(PROCS[:1], RANK, True)
    path = tmp_path / "checkpoint-1" / "pytorch_lora_weights.safetensors"
    path.parent.mkdir()
    for pad in range(400):  # header length is padded to 8 bytes: find one whose low byte is 0x80 (pickle's magic)
        save_file(state, str(path), metadata={"format": "pt", "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert len(readers.read_any(path).layers) == 4


@pytest.mark.parametrize("zip_format", [True, False])
def test_flux_file_in_either_torch_save_format_is_read(tmp_path, zip_format):
    state = ref.flux_state(double_blocks=1, single_blocks=0, hidden=16, rank=RANK)
    path = tmp_path / "checkpoint-2" / "lora.pt"
    path.parent.mkdir()
    torch.save(state, str(path), _use_new_zipfile_serialization=zip_format)
    assert len(readers.read_any(path).layers) == 7


def test_read_any_dispatches_every_known_format(tmp_path):
    sdxl = ref.write_sdxl_checkpoint(tmp_path / "s", ref.sdxl_state(PROCS, RANK, True), SDXL_HPARAMS)
    flux = ref.write_flux_checkpoint(tmp_path / "f", ref.flux_state(1, 1, 16, RANK), FLUX_HPARAMS)
    weights = lyco_weights()
    lyco = write_lycoris(tmp_path, ref.lycoris_state(weights, rank=4, alpha=1.0)[0])
    assert readers.read_any(sdxl).config.source == readers.FORMAT_REFERENCE_SDXL
    assert readers.read_any(flux).config.source == readers.FORMAT_REFERENCE_FLUX
    assert readers.read_any(lyco, base_weights=weights).config.source == readers.FORMAT_LYCORIS
    own = TLora(TLoraConfig(rank=4, min_rank=2), {"diffusion_model.a": ortho_factors(8, 8, 4, seed=1)})
    path = save_tlora(own, tmp_path / "own.safetensors")
    assert readers.read_any(path).config == own.config
    assert readers.read_any(path, min_rank=3).config.min_rank == 3


def test_sniff_tells_a_vanilla_reference_file_from_an_ordinary_lora_only_by_key_layout():
    vanilla = ref.sdxl_state(PROCS[:1], 4, ortho=False)
    assert readers.sniff_format(vanilla, {})[0] == readers.FORMAT_REFERENCE_SDXL
    assert readers.sniff_format({"a.b.lora_A.weight": torch.zeros(1)}, {})[0] == readers.FORMAT_STANDARD_LORA
    assert readers.sniff_format({}, {"tlora.format": "comfyui-tlora"})[0] == readers.FORMAT_PACK


def test_config_json_of_a_read_file_is_plain_json(tmp_path):
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(PROCS, RANK, True), SDXL_HPARAMS)
    data = json.loads(readers.read_any(path).config.to_json())
    assert data["training"]["imported_from"] == readers.FORMAT_REFERENCE_SDXL
    pickle.dumps(data)


# ---- ComfyUI resolves the keys ------------------------------------------------------------------------

def test_flux_layer_keys_are_in_comfyuis_flux_key_map(comfy, tmp_path):
    import comfy.utils

    tlora = readers.read_reference_flux(ref.write_flux_checkpoint(tmp_path, ref.flux_state(2, 2, 16, RANK)))
    diffusers = comfy.utils.flux_to_diffusers({"depth": 2, "depth_single_blocks": 2, "hidden_size": 16},
                                              output_prefix="diffusion_model.")
    comfy_keys = {"transformer." + k[: -len(".weight")] for k in diffusers if k.endswith(".weight")}
    assert set(tlora.layers) <= comfy_keys


def test_read_any_reads_a_reference_file_once(tmp_path, monkeypatch):
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(PROCS, RANK, ortho=True), SDXL_HPARAMS)
    real, reads = readers.load_state_dict, []
    monkeypatch.setattr(readers, "load_state_dict", lambda p: reads.append(p) or real(p))
    tlora = readers.read_any(path)
    assert reads == [path] and tlora.config.variant == "tlora"


def test_reference_layout_sd15_file_loads_on_an_sd15_model(tiny_sd15, tmp_path):
    """Such files used to be taken for SD-XL and refused on SD 1.5."""
    from tlora_pack.trainer.runtime import apply_tlora

    procs = [f"down_blocks.0.attentions.0.transformer_blocks.0.attn{i}.processor" for i in (1, 2)]
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state(procs, RANK, True, hidden=320, context=768),
                                     SDXL_HPARAMS)
    patched, runtime = apply_tlora(tiny_sd15[0], readers.read_any(path))
    assert len(runtime.layers) == 8 and runtime.tlora.config.base_model == "SD15"
