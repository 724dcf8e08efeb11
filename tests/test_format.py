"""TLoraConfig (settings = file metadata) and the .safetensors file format.

Files are inspected with safetensors' own reader, independently of the pack's loader, and dW is
rebuilt by hand (B diag(S*m) A - B0 diag(S0*m) A0) to measure what fp16 storage costs.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tlora_pack.tlora_core import format as fmt
from tlora_pack.tlora_core import init
from tlora_pack.tlora_core.adapter import LayerFactors
from tlora_pack.tlora_core.config import TLoraConfig
from tlora_pack.tlora_core.errors import TLoraConfigError, TLoraError, TLoraFormatError

RANK = 8


# ---- settings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    ({"rank": 8, "min_rank": 0}, "0"),
    ({"rank": 8, "min_rank": -2}, "-2"),
    ({"rank": 8, "min_rank": 9}, "9"),
    ({"rank": 0, "min_rank": 1}, "0"),
    ({"variant": "dora"}, "dora"),
    ({"exponent": float("nan")}, "nan"),
    ({"exponent": float("inf")}, "inf"),
    ({"exponent": -1.0}, "-1.0"),
    ({"max_timestep": 0}, "0"),
    ({"init": "random"}, "random"),
])
def test_config_rejects_bad_values_and_names_them(kwargs, needle):
    with pytest.raises(TLoraConfigError) as err:
        TLoraConfig(**kwargs)
    assert needle in str(err.value)


def test_config_rejects_r_min_above_rank_with_both_numbers():
    with pytest.raises(TLoraConfigError) as err:
        TLoraConfig(rank=16, min_rank=17)
    assert "16" in str(err.value) and "17" in str(err.value)


def test_config_accepts_the_paper_defaults_and_edge_ranks():
    cfg = TLoraConfig()
    assert (cfg.rank, cfg.min_rank, cfg.exponent, cfg.max_timestep, cfg.variant) == (64, 32, 1.0, 1000, "tlora")
    assert TLoraConfig(rank=4, min_rank=4).min_rank == 4
    assert TLoraConfig(rank=4, min_rank=1).min_rank == 1
    assert isinstance(TLoraConfig(exponent=2).exponent, float)


def test_unmasked_variants_keep_full_rank_in_the_schedule():
    assert TLoraConfig(rank=8, min_rank=2, variant="ortho_lora").schedule_min_rank == 8
    assert TLoraConfig(rank=8, min_rank=2, variant="lora").schedule_min_rank == 8
    assert TLoraConfig(rank=8, min_rank=2, variant="tlora").schedule_min_rank == 2
    assert TLoraConfig(rank=8, min_rank=2, variant="vanilla_tlora").schedule_min_rank == 2
    assert TLoraConfig(variant="tlora").ortho and not TLoraConfig(variant="vanilla_tlora").ortho


def test_config_json_round_trip_is_equal():
    cfg = TLoraConfig(rank=16, min_rank=4, exponent=1.5, variant="vanilla_tlora", init="middle",
                      base_model="SDXL", trigger="sks", class_word="dog", source="trainer",
                      training={"lr": 1e-4, "steps": 800, "betas": [0.9, 0.999]})
    text = cfg.to_json()
    assert json.loads(text)["min_rank"] == 4
    assert TLoraConfig.from_json(text) == cfg


def test_config_with_unknown_fields_asks_for_a_newer_version():
    data = json.loads(TLoraConfig().to_json())
    data["rank_schedule_v2"] = "cosine"
    with pytest.raises(TLoraConfigError) as err:
        TLoraConfig.from_json(json.dumps(data))
    assert "rank_schedule_v2" in str(err.value) and "newer version" in str(err.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_config_from_broken_json_is_refused(text):
    with pytest.raises(TLoraConfigError):
        TLoraConfig.from_json(text)


def test_config_from_json_validates_values():
    with pytest.raises(TLoraConfigError, match="99"):
        TLoraConfig.from_json(json.dumps({"rank": 8, "min_rank": 99}))


# ---- file format --------------------------------------------------------------------------------------

def trained_like(seed, in_f, out_f, drift, base=True):
    """Ortho init, then every trainable factor moved by `drift` (relative), as training would."""
    f = init.ortho_factors(in_f, out_f, RANK, seed=seed, layer_key=f"l{seed}") if base else \
        init.vanilla_factors(in_f, out_f, RANK, seed=seed, layer_key=f"l{seed}")
    g = torch.Generator().manual_seed(100 + seed)
    f.down = f.down + drift * f.down.abs().mean() * torch.randn(f.down.shape, generator=g)
    f.up = f.up + drift * (f.up.abs().mean() if base else 0.1) * torch.randn(f.up.shape, generator=g)
    if f.scale is not None:
        f.scale = f.scale * (1 + drift * torch.randn(f.scale.shape, generator=g))
    return f


def small_tlora(drift=0.1, base=True) -> fmt.TLora:
    cfg = TLoraConfig(rank=RANK, min_rank=2, variant="tlora" if base else "vanilla_tlora", base_model="SD15",
                      trigger="sks", training={"steps": 10})
    layers = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": trained_like(1, 16, 16, drift, base),
              "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": trained_like(2, 24, 16, drift, base),
              "diffusion_model.middle_block.1.proj_in": trained_like(3, 16, 12, drift, base)}
    return fmt.TLora(config=cfg, layers=layers)


def hand_delta(f: LayerFactors, k: int) -> torch.Tensor:
    m = torch.tensor([1.0] * k + [0.0] * (f.rank - k), dtype=torch.float64)
    s = f.scale.double() if f.scale is not None else torch.ones(f.rank, dtype=torch.float64)
    w = f.up.double() @ torch.diag(s * m) @ f.down.double()
    if f.base_down is not None:
        w = w - f.base_up.double() @ torch.diag(f.base_scale.double() * m) @ f.base_down.double()
    return w


def test_save_load_round_trip_is_bit_exact_in_fp32(tmp_path):
    tl = small_tlora()
    path = fmt.save_tlora(tl, tmp_path / "a.safetensors")
    back = fmt.load_tlora(path)
    assert back.config == tl.config
    assert set(back.layers) == set(tl.layers)
    for key, f in tl.layers.items():
        assert set(back.layers[key].tensors()) == set(f.tensors()) == {"down", "up", "scale", "base_down",
                                                                        "base_up", "base_scale"}
        for name, t in f.tensors().items():
            assert torch.equal(back.layers[key].tensors()[name], t), (key, name)


def test_saved_file_has_the_documented_keys_and_metadata(tmp_path):
    tl = small_tlora()
    path = fmt.save_tlora(tl, tmp_path / "a.safetensors", storage="fp16")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
        dtypes = {fh.get_tensor(k).dtype for k in keys}
    layer = "diffusion_model.middle_block.1.proj_in"
    assert {f"{layer}.tlora_{n}" for n in ("down", "up", "scale", "base_down", "base_up", "base_scale")} <= keys
    assert len(keys) == 3 * 6
    assert dtypes == {torch.float16}
    assert meta["tlora.format"] == "comfyui-tlora" and meta["tlora.format_version"] == "1"
    assert meta["tlora.storage"] == "fp16"
    assert TLoraConfig.from_json(meta["tlora.config"]) == tl.config


def vanilla_round_trip_error(tmp_path, storage):
    tl = small_tlora(base=False)
    back = fmt.load_tlora(fmt.save_tlora(tl, tmp_path / f"v_{storage}.safetensors", storage=storage))
    return max(((hand_delta(back.layers[k], RANK) - hand_delta(f, RANK)).norm() / hand_delta(f, RANK).norm()).item()
               for k, f in tl.layers.items())


@pytest.mark.parametrize("drift", [0.01, 0.1, 1.0])
def test_fp16_storage_error_of_the_update_is_small(tmp_path, drift):
    """With base subtraction (Eq. 6) dW is the difference of two products of nearly equal size. Rounding
    the trained and frozen factors independently gave errors growing like 5e-4 / drift (5e-2 at drift
    0.01); 16-bit files store residuals from the frozen factors, so the error stays at fp16 precision
    (measured 3.9e-4 .. 4.3e-4 for every drift). fp32 storage is exact (see the round-trip test)."""
    tl = small_tlora(drift=drift)
    back = fmt.load_tlora(fmt.save_tlora(tl, tmp_path / "h.safetensors", storage="fp16"))
    worst = 0.0
    for k in (RANK, 5, 2):  # t = 0, a middle t, t near T (r_min = 2)
        for key, f in tl.layers.items():
            ref = hand_delta(f, k)
            err = ((hand_delta(back.layers[key], k) - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
    print(f"fp16 storage, drift {drift}: worst relative Frobenius error of dW = {worst:.2e}")
    assert worst < 1e-3
    assert worst > 0  # fp16 really is lossy: this test measures something


def test_fp16_storage_without_base_is_accurate_to_fp16_precision(tmp_path):
    err = vanilla_round_trip_error(tmp_path, "fp16")
    print(f"fp16 storage, vanilla (no base): relative Frobenius error of dW = {err:.2e}")
    assert 0 < err < 1e-3
    assert vanilla_round_trip_error(tmp_path, "fp32") == 0


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_low_precision_storage_keeps_the_update_exactly_zero_at_init(tmp_path, storage):
    tl = small_tlora(drift=0.0)
    back = fmt.load_tlora(fmt.save_tlora(tl, tmp_path / "z.safetensors", storage=storage))
    for f in back.layers.values():
        for k in range(RANK + 1):
            assert torch.count_nonzero(hand_delta(f, k)) == 0


def test_unknown_storage_dtype_is_refused(tmp_path):
    with pytest.raises(TLoraError, match="fp8"):
        fmt.save_tlora(small_tlora(), tmp_path / "a.safetensors", storage="fp8")
    assert list(tmp_path.iterdir()) == []


def test_saving_never_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "taken.safetensors"
    path.write_bytes(b"precious bytes")
    with pytest.raises(TLoraError) as err:
        fmt.save_tlora(small_tlora(), path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == b"precious bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


def test_a_failing_write_leaves_neither_the_file_nor_a_temp_file(tmp_path, monkeypatch):
    def broken_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)  # half a file ...
        raise OSError("disk full")  # ... then the disk fills up

    monkeypatch.setattr(fmt, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        fmt.save_tlora(small_tlora(), tmp_path / "out" / "a.safetensors")
    assert list((tmp_path / "out").iterdir()) == []


def test_saving_creates_missing_folders(tmp_path):
    path = fmt.save_tlora(small_tlora(), tmp_path / "x" / "y" / "a.safetensors")
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.safetensors"]


def write_raw(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_newer_format_version_is_refused(tmp_path):
    path = write_raw(tmp_path / "new.safetensors", {"l.tlora_down": torch.zeros(2, 3), "l.tlora_up": torch.zeros(4, 2)},
                     {"tlora.format": "comfyui-tlora", "tlora.format_version": "2",
                      "tlora.config": json.dumps({"rank": 2, "min_rank": 1})})
    with pytest.raises(TLoraFormatError) as err:
        fmt.load_tlora(path)
    assert "version 2" in str(err.value) and str(path) in str(err.value)


def test_a_hand_written_version_1_file_loads(tmp_path):
    down, up = torch.randn(2, 3), torch.randn(4, 2)
    path = write_raw(tmp_path / "v1.safetensors", {"l.tlora_down": down, "l.tlora_up": up},
                     {"tlora.format": "comfyui-tlora", "tlora.format_version": "1",
                      "tlora.config": json.dumps({"rank": 2, "min_rank": 1, "variant": "vanilla_tlora"})})
    tl = fmt.load_tlora(path)
    assert torch.equal(tl.layers["l"].down, down) and torch.equal(tl.layers["l"].up, up)
    assert not tl.layers["l"].has_base and tl.config.variant == "vanilla_tlora"


def test_a_file_that_is_not_safetensors_names_its_path(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is not a tensor file")
    with pytest.raises(TLoraFormatError) as err:
        fmt.load_tlora(path)
    assert str(path) in str(err.value)


def test_a_missing_file_names_its_path(tmp_path):
    with pytest.raises(TLoraFormatError) as err:
        fmt.load_tlora(tmp_path / "nowhere.safetensors")
    assert "nowhere.safetensors" in str(err.value)


def test_a_plain_lora_file_is_not_taken_for_a_tlora(tmp_path):
    path = write_raw(tmp_path / "lora.safetensors", {"x.lora_down.weight": torch.zeros(2, 3)}, {"format": "pt"})
    with pytest.raises(TLoraFormatError, match="comfyui-tlora"):
        fmt.load_tlora(path)


def test_unexpected_tensor_and_rank_mismatch_are_named(tmp_path):
    meta = {"tlora.format": "comfyui-tlora", "tlora.format_version": "1",
            "tlora.config": json.dumps({"rank": 2, "min_rank": 1})}
    odd = write_raw(tmp_path / "odd.safetensors", {"l.tlora_down": torch.zeros(2, 3), "l.tlora_up": torch.zeros(4, 2),
                                                   "l.tlora_gate": torch.zeros(2)}, meta)
    with pytest.raises(TLoraFormatError, match="l.tlora_gate"):
        fmt.load_tlora(odd)
    wrong = write_raw(tmp_path / "wrong.safetensors", {"l.tlora_down": torch.zeros(3, 3), "l.tlora_up": torch.zeros(4, 3)},
                      meta)
    with pytest.raises(TLoraFormatError, match="rank 3"):
        fmt.load_tlora(wrong)
    lone = write_raw(tmp_path / "lone.safetensors", {"l.tlora_down": torch.zeros(2, 3)}, meta)
    with pytest.raises(TLoraFormatError, match="lacks"):
        fmt.load_tlora(lone)


def test_value_count_and_delta_weights_cover_every_layer():
    tl = small_tlora()
    expected = sum(2 * (RANK * (i + o) + RANK) for i, o in [(16, 16), (24, 16), (16, 12)])
    assert tl.num_values() == expected
    dws = tl.delta_weights(torch.tensor([1.0] * 3 + [0.0] * (RANK - 3)))
    for key, f in tl.layers.items():
        torch.testing.assert_close(dws[key].double(), hand_delta(f, 3), atol=1e-5, rtol=1e-5)


def test_saved_files_get_the_usual_umask_mode_not_0600(tmp_path):
    """A ComfyUI running as another user, or a shared models folder, must be able to read the file."""
    import os
    umask = os.umask(0o022)
    try:
        path = fmt.save_tlora(small_tlora(), tmp_path / "mode.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
