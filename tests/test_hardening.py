"""Bad input gets a clear error that names the problem and the fix; nothing a user made is lost; files are safe.

One section per promise of docs/troubleshooting.md: files that cannot be read, T-LoRAs that do not fit the
model, settings out of range, images and masks, file names, saving (failures simulated), training failures,
pickle safety. In-process throughout; the tiny SD1.5 model stands in for a real one.
"""
import ast
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tlora_pack.tlora_core import format as fmt
from tlora_pack.tlora_core import readers
from tlora_pack.tlora_core.config import TLoraConfig
from tlora_pack.tlora_core.errors import TLoraConfigError, TLoraError, TLoraFormatError, TLoraSaveError
from tlora_pack.tlora_core.export import save_standard_lora
from tlora_pack.tlora_core.format import TLora, load_tlora, save_tlora
from tlora_pack.tlora_core.init import ortho_factors

REPO = Path(__file__).resolve().parent.parent
PACK_DIRS = ("tlora_core", "trainer", "nodes")


def small_tlora(base_model="SD15", rank=2, min_rank=1, trained=True) -> TLora:
    layers = {"diffusion_model.a.attn1.to_q": ortho_factors(4, 6, rank, seed=1, layer_key="a"),
              "diffusion_model.b.attn2.to_k": ortho_factors(3, 5, rank, seed=1, layer_key="b")}
    if trained:
        for f in layers.values():
            f.up = f.up + 0.1
    return TLora(TLoraConfig(rank=rank, min_rank=min_rank, base_model=base_model), layers)


def pack_metadata(**changes):
    meta = {"tlora.format": "comfyui-tlora", "tlora.format_version": "1",
            "tlora.config": json.dumps({"rank": 2, "min_rank": 1}), "tlora.residuals": "0"}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def pack_tensors():
    return {"l.tlora_down": torch.ones(2, 3), "l.tlora_up": torch.ones(4, 2)}


def write_raw(path: Path, tensors: dict, metadata=None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def refusal(reader, path, *needles, kind=TLoraFormatError) -> str:
    """The reader refuses `path` with `kind`; the message names the file and every needle."""
    with pytest.raises(kind) as err:
        reader(path)
    text = str(err.value)
    assert str(path) in text, text
    for needle in needles:
        assert needle.lower() in text.lower(), (needle, text)
    return text


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- files that cannot be read ------------------------------------------------------------------------

NOT_SAFETENSORS = {
    "png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    "text": b"this is a text file, not weights\n" * 4,
    "empty": b"",
    "zip_not_torch": b"PK\x03\x04" + b"\x00" * 60,
    "gzip": b"\x1f\x8b\x08\x00" + b"\x00" * 40,
    "pickle_garbage": b"\x80\x04\x95garbage",
}


@pytest.mark.parametrize("kind", sorted(NOT_SAFETENSORS))
@pytest.mark.parametrize("reader", [readers.read_any, load_tlora], ids=["read_any", "load_tlora"])
def test_a_file_that_is_not_safetensors_is_refused_naming_it(tmp_path, kind, reader):
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(NOT_SAFETENSORS[kind])
    text = refusal(reader, path)
    assert any(w in text for w in ("not a readable .safetensors", "torch file", "not a T-LoRA")), text


@pytest.mark.parametrize("keep", [0.01, 0.3, 0.6, 0.99])
def test_a_truncated_tlora_says_truncated_and_to_get_the_file_again(tmp_path, keep):
    good = save_tlora(small_tlora(), tmp_path / "good.safetensors")
    raw = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:max(1, int(len(raw) * keep))])
    for reader in (readers.read_any, load_tlora):
        refusal(reader, cut, "truncated", "again")


def test_a_corrupt_header_is_refused(tmp_path):
    raw = bytearray(save_tlora(small_tlora(), tmp_path / "good.safetensors").read_bytes())
    raw[12:20] = b"\x00\xff{]\x01\x02\x03\x04"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    refusal(readers.read_any, bad, "not a readable .safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_corrupt_values_nan_or_inf_are_refused_naming_the_layer(tmp_path, value):
    tensors = pack_tensors()
    tensors["l.tlora_up"][1, 1] = value
    path = write_raw(tmp_path / "nan.safetensors", tensors, pack_metadata())
    refusal(load_tlora, path, "'l'", "up", "NaN or infinite", "earlier checkpoint")


def test_a_tensor_of_the_wrong_dimension_is_refused_naming_it(tmp_path):
    path = write_raw(tmp_path / "dims.safetensors", {"l.tlora_down": torch.tensor(1.0), "l.tlora_up": torch.ones(4, 2)},
                     pack_metadata())
    refusal(load_tlora, path, "'l'", "down", "2-D")


def test_a_newer_format_version_asks_to_update_the_pack(tmp_path):
    path = write_raw(tmp_path / "v2.safetensors", pack_tensors(), pack_metadata(**{"tlora.format_version": "2"}))
    for reader in (readers.read_any, load_tlora):
        refusal(reader, path, "version 2", "update the pack")


def test_settings_from_a_newer_pack_ask_to_update_the_pack(tmp_path):
    config = json.dumps({"rank": 2, "min_rank": 1, "noise_schedule_v2": "cosine"})
    path = write_raw(tmp_path / "newer.safetensors", pack_tensors(), pack_metadata(**{"tlora.config": config}))
    refusal(readers.read_any, path, "noise_schedule_v2", "newer version", "update the pack")


def test_an_unknown_format_name_asks_to_update_the_pack(tmp_path):
    path = write_raw(tmp_path / "other.safetensors", pack_tensors(),
                     pack_metadata(**{"tlora.format": "comfyui-tlora-2"}))
    refusal(readers.read_any, path, "comfyui-tlora-2", "update the pack")


@pytest.mark.parametrize("config", ["{not json", "[1, 2]", json.dumps({"rank": 2, "min_rank": 1, "variant": ["x"]}),
                                    json.dumps({"rank": "2"}), "[" * 5000])
def test_malformed_settings_metadata_is_refused_naming_the_file(tmp_path, config):
    path = write_raw(tmp_path / "odd.safetensors", pack_tensors(), pack_metadata(**{"tlora.config": config}))
    refusal(load_tlora, path)


def test_missing_settings_or_stripped_metadata_are_named(tmp_path):
    no_config = write_raw(tmp_path / "noconfig.safetensors", pack_tensors(), pack_metadata(**{"tlora.config": None}))
    refusal(readers.read_any, no_config, "tlora.config", "original file")
    stripped = write_raw(tmp_path / "stripped.safetensors", pack_tensors())
    refusal(readers.read_any, stripped, "no tlora.format metadata", "re-saved")


def test_a_standard_lora_given_to_load_tlora_points_at_loraloader_and_the_conversion(tmp_path):
    path = write_raw(tmp_path / "style.safetensors",
                     {"lora_unet_x_to_q.lora_down.weight": torch.zeros(4, 16),
                      "lora_unet_x_to_q.lora_up.weight": torch.zeros(16, 4),
                      "lora_unet_x_to_q.alpha": torch.tensor(4.0)})
    refusal(readers.read_any, path, "ordinary LoRA", "not a T-LoRA", "LoraLoader", "Export T-LoRA as LoRA")


def test_an_exported_lora_given_to_load_tlora_points_at_loraloader_and_the_original(tmp_path):
    path, _ = save_standard_lora(small_tlora(), tmp_path / "exported.safetensors")
    refusal(readers.read_any, path, "exported from a T-LoRA", "LoraLoader", "original T-LoRA")


def test_explicit_schedule_overrides_out_of_range_are_refused_on_load(tmp_path):
    path = save_tlora(small_tlora(rank=2, min_rank=1), tmp_path / "t.safetensors")
    refusal(lambda p: readers.read_any(p, min_rank=3), path, "r_min", "3")
    refusal(lambda p: readers.read_any(p, min_rank=0), path, "r_min")


def test_a_missing_file_or_a_folder_is_named(tmp_path):
    refusal(readers.read_any, tmp_path / "nowhere.safetensors", "no file")
    refusal(readers.read_any, tmp_path, "no file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_file_is_refused_naming_it(tmp_path):
    path = save_tlora(small_tlora(), tmp_path / "locked.safetensors")
    path.chmod(0)
    try:
        refusal(readers.read_any, path, "cannot be read")
    finally:
        path.chmod(0o600)


# ---- pickle-based inputs ----------------------------------------------------------------------------------

class _Trap:
    """Unpickling this runs os.mkdir(marker): proof that arbitrary code would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoint-1" / "lora.pt"
    path.parent.mkdir()
    torch.save({"transformer_blocks.0.attn.processor.to_q_lora.down.weight": torch.zeros(2, 4),
                "payload": _Trap(str(marker))}, str(path), _use_new_zipfile_serialization=zip_format)
    for reader in (readers.read_any, readers.read_reference_flux, readers.load_state_dict):
        refusal(reader, path, "never unpickled")
    assert not marker.exists()


def test_torch_files_are_only_ever_read_with_weights_only(tmp_path, monkeypatch):
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = tmp_path / "checkpoint-1" / "lora.pt"
    path.parent.mkdir()
    torch.save({"transformer_blocks.0.attn.processor.to_q_lora.down.weight": torch.ones(2, 4),
                "transformer_blocks.0.attn.processor.to_q_lora.up.weight": torch.ones(4, 2)}, str(path))
    readers.read_any(path)
    assert seen and all(flag is True for flag in seen)


def _calls(tree_: ast.AST):
    for node in ast.walk(tree_):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            yield owner, node.func.attr, node


def test_no_code_in_the_pack_unpickles_without_weights_only():
    """Source scan: every torch.load passes weights_only=True; no pickle/dill/joblib loads, no allow_pickle."""
    sources = [p for d in PACK_DIRS for p in (REPO / d).rglob("*.py")] + [REPO / "__init__.py"]
    problems = []
    for path in sources:
        for owner, attr, call in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            kwargs = {k.arg: k.value for k in call.keywords}
            if (owner, attr) == ("torch", "load"):
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "dill", "joblib", "cloudpickle") and attr in ("load", "loads", "Unpickler"):
                problems.append(f"{where}: {owner}.{attr}")
            allow = kwargs.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                problems.append(f"{where}: allow_pickle=True")
    assert not problems, problems
    assert len(sources) > 10


# ---- T-LoRAs that do not fit the model (tiny SD1.5) ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_factors(tiny_sd15):
    """Vanilla-init factors (no SVD: cheap) for every attention projection of the tiny model, rank 2."""
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import find_target_layers, new_factors

    layers = find_target_layers(tiny_sd15[0].model, "attention")
    return new_factors(layers, TrainSettings(rank=2, min_rank=1, variant="lora"), False, torch.device("cpu"))


def _tiny_tlora(factors, base_model="SD15") -> TLora:
    return TLora(TLoraConfig(rank=2, min_rank=1, variant="vanilla_tlora", base_model=base_model), dict(factors))


@pytest.mark.parametrize("family, shown", [("SDXL", "SD-XL"), ("Flux", "Flux"), ("SD3", "SD3")])
def test_a_tlora_for_another_model_family_names_both(tiny_sd15, tiny_factors, family, shown):
    from tlora_pack.trainer.runtime import apply_tlora

    with pytest.raises(TLoraError) as err:
        apply_tlora(tiny_sd15[0], _tiny_tlora(tiny_factors, base_model=family))
    text = str(err.value)
    assert shown in text and family in text and "SD1.x" in text and "SD15" in text, text


def test_layers_that_match_nothing_in_the_model_are_refused(tiny_sd15):
    from tlora_pack.trainer.runtime import apply_tlora

    tl = TLora(TLoraConfig(rank=2, min_rank=1), {"diffusion_model.no.such.layer.to_q": ortho_factors(4, 6, 2)})
    with pytest.raises(TLoraError) as err:
        apply_tlora(tiny_sd15[0], tl)
    assert "no.such.layer" in str(err.value) and "match" in str(err.value) and "checkpoint" in str(err.value)


def test_some_layers_matching_nothing_are_reported_with_a_count_and_an_example(tiny_sd15, tiny_factors, caplog):
    from tlora_pack.trainer.runtime import apply_tlora

    tl = _tiny_tlora(tiny_factors)
    tl.layers["diffusion_model.no.such.layer.to_q"] = ortho_factors(4, 6, 2)
    with caplog.at_level(logging.WARNING):
        apply_tlora(tiny_sd15[0], tl)
    assert f"1 of {len(tl.layers)} layers" in caplog.text and "no.such.layer" in caplog.text


def test_layers_of_the_wrong_shape_are_refused_naming_layer_and_model_shape(tiny_sd15, tiny_factors):
    from tlora_pack.trainer.runtime import apply_tlora

    key = next(iter(_tiny_tlora(tiny_factors).layers))
    tl = TLora(TLoraConfig(rank=2, min_rank=1), {key: ortho_factors(7, 5, 2)})
    with pytest.raises(TLoraError) as err:
        apply_tlora(tiny_sd15[0], tl)
    assert key in str(err.value) and "[5, 7]" in str(err.value) and "another model" in str(err.value)


@pytest.mark.parametrize("min_rank", [-1, 3])
def test_apply_refuses_r_min_outside_1_to_rank(tiny_sd15, tiny_factors, min_rank):
    from tlora_pack.trainer.runtime import apply_tlora

    with pytest.raises(TLoraError, match=f"r_min.*rank 2.*{min_rank}"):
        apply_tlora(tiny_sd15[0], _tiny_tlora(tiny_factors), min_rank=min_rank)


# ---- training settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    ({"min_rank": 0}, "min_rank"), ({"rank": 4, "min_rank": 5}, "min_rank"), ({"rank": 0}, "rank"),
    ({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"steps": 2.5}, "steps"),
    ({"learning_rate": float("nan")}, "learning_rate"), ({"learning_rate": float("inf")}, "learning_rate"),
    ({"learning_rate": -float("inf")}, "learning_rate"), ({"learning_rate": -1e-4}, "learning_rate"),
    ({"optimizer": "sgd"}, "optimizer"), ({"sigma_draw": "shifted"}, "sigma_draw"), ({"crop": "left"}, "crop"),
    ({"max_grad_norm": -0.5}, "max_grad_norm"), ({"max_grad_norm": float("nan")}, "max_grad_norm"),
    ({"learning_rate": "1e-4"}, "learning_rate"), ({"weight_decay": float("nan")}, "weight_decay"),
    ({"exponent": float("inf")}, "exponent"), ({"batch_size": 0}, "batch_size"), ({"save_every": -1}, "save_every"),
    ({"variant": "dora"}, "variant"), ({"storage": "fp8"}, "storage"),
    ({"rank": True}, "rank"), ({"min_rank": 2.0}, "min_rank"), ({"trigger": None}, "trigger"),
])
def test_bad_training_settings_are_refused_naming_the_field_and_value(changes, field):
    from tlora_pack.trainer.settings import TrainSettings

    with pytest.raises(TLoraConfigError) as err:
        TrainSettings(**changes)
    if set(changes) <= set(TLoraConfig.__dataclass_fields__):  # the T-LoRA's own settings: one check, one message
        with pytest.raises(TLoraConfigError) as same:
            TLoraConfig(**changes)
        assert str(same.value) == str(err.value)


def test_training_settings_record_the_run_and_make_the_files_config():
    from tlora_pack.trainer.settings import TrainSettings

    s = TrainSettings(rank=8, min_rank=3, exponent=2, steps=5, learning_rate=3e-4)
    config = s.tlora_config(base_model="SD15", source="test")
    assert type(config) is TLoraConfig and (config.rank, config.min_rank, config.exponent) == (8, 3, 2.0)
    assert (config.base_model, config.source, config.trigger, config.class_word) == ("SD15", "test", "sks", "dog")
    assert config.training == s.record() and config.training["learning_rate"] == 3e-4
    assert not {"base_model", "source", "training"} & set(config.training)
    assert TLoraConfig.from_json(config.to_json()) == config


def test_a_rank_larger_than_a_layer_allows_is_refused_before_anything_is_written(tiny_sd15, tmp_path):
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import train_tlora

    patcher, clip, vae = tiny_sd15  # attention width 320
    settings = TrainSettings(rank=321, min_rank=1, steps=1, resolution=64)
    with pytest.raises(TLoraConfigError) as err:
        train_tlora(patcher, clip, vae, torch.rand(1, 64, 64, 3), None, settings, str(tmp_path), "t/run")
    assert "rank 321 is larger than layer" in str(err.value) and "= 320" in str(err.value)
    assert tree(tmp_path) == {}


# ---- images and masks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 0, 64, 3), (1, 64, 0, 3), (0, 64, 64, 3), (1, 64, 64, 0), (0, 0, 3)])
def test_an_empty_image_is_refused(shape):
    from tlora_pack.trainer.data import prepare_images

    with pytest.raises(TLoraError, match="empty"):
        prepare_images(torch.rand(shape), None, 0, 512)


def test_an_image_larger_than_the_model_can_take_is_refused_with_the_fix():
    from tlora_pack.trainer.data import MAX_RESOLUTION, prepare_images

    huge = torch.rand(1, 4 * MAX_RESOLUTION + 1, 8, 3)
    with pytest.raises(TLoraError, match="Downscale"):
        prepare_images(huge, None, 0, 512)
    with pytest.raises(TLoraError, match=f"resolution {2 * MAX_RESOLUTION}.*smaller resolution"):
        prepare_images(torch.rand(1, 64, 64, 3), None, 2 * MAX_RESOLUTION, 512)


@pytest.mark.parametrize("mask_shape", [(1, 32, 64), (64, 32), (1, 64, 65), (2, 64, 64), (64,), (1, 1, 64, 64, 1)])
def test_a_mask_that_does_not_fit_the_image_is_refused(mask_shape):
    from tlora_pack.trainer.data import prepare_images

    with pytest.raises(TLoraError, match="(?i)mask"):
        prepare_images(torch.rand(1, 64, 64, 3), torch.ones(mask_shape), 64, 512)


@pytest.mark.parametrize("mask_shape", [(64, 48), (1, 64, 48), (1, 64, 48, 1)])
def test_masks_in_every_comfyui_layout_are_accepted(mask_shape):
    from tlora_pack.trainer.data import prepare_images

    _, weights = prepare_images(torch.rand(1, 64, 48, 3), torch.ones(mask_shape), 64, 512)
    assert weights.shape == (1, 64, 64) and torch.allclose(weights, torch.ones(1, 64, 64))


def test_resolution_0_trains_at_the_models_native_size_even_from_a_small_photo():
    """The paper trains SD-XL at 1024: a 100x80 photo is centre-cropped and resized up to the native size."""
    from tlora_pack.trainer.data import prepare_images

    pixels, _ = prepare_images(torch.rand(1, 100, 80, 3), None, 0, 1024)
    assert pixels.shape == (1, 1024, 1024, 3)


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_rgba_images_become_rgb(channels):
    from tlora_pack.trainer.data import prepare_images

    image = torch.rand(2, 80, 64, channels)
    pixels, _ = prepare_images(image, None, 64, 512)
    want = image[:, 8:72, :, :1].expand(-1, -1, -1, 3) if channels == 1 else image[:, 8:72, :, :3]
    assert pixels.shape == (2, 64, 64, 3)
    torch.testing.assert_close(pixels, want)


@pytest.mark.parametrize("channels", [1, 4])
def test_training_on_a_grayscale_or_rgba_image_just_works(tiny_sd15, tmp_path, channels):
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import train_tlora

    patcher, clip, vae = tiny_sd15
    image = torch.rand(1, 64, 64, channels, generator=torch.Generator().manual_seed(channels))
    result = train_tlora(patcher, clip, vae, image, torch.ones(64, 64), TrainSettings(rank=2, min_rank=1, steps=1,
                         resolution=64), str(tmp_path), "t/run")
    assert [p.name for p in result.saved] == ["run_00001.safetensors"] and len(result.losses) == 1


# ---- file names ----------------------------------------------------------------------------------------------

REFUSED_PREFIXES = ["../escape", "tlora/../../escape", "..", "/etc/escape", "~/escape", "C:/escape", "c:escape",
                    "a\\..\\escape", "a/./b", "a//b", "a/", "", "   ", "a:b", "a|b", "a*b", "a?b", 'a"b', "a<b",
                    "a>b", "a\x00b", "a\nb", "a\tb", "CON/x", "nul.txt/x", "dots./x", "space /x", "x" * 201,
                    "a/" + "é" * 101, "bad\udc80"]


@pytest.mark.parametrize("prefix", REFUSED_PREFIXES)
def test_a_prefix_that_leaves_models_loras_or_that_the_os_refuses_is_refused(tmp_path, prefix):
    from tlora_pack.trainer.files import next_free_path, safe_prefix

    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    with pytest.raises(TLoraError, match="prefix"):
        safe_prefix(prefix)
    with pytest.raises(TLoraError, match="prefix"):
        next_free_path(loras, prefix)
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("prefix", ["tlora/my dog", "ünïcödé/狗", "con", "a.b/c.d", "deep/er/still", " padded "])
def test_ordinary_prefixes_stay_inside_models_loras(tmp_path, prefix):
    from tlora_pack.trainer.files import next_free_path

    loras = (tmp_path / "loras").resolve()
    path = next_free_path(loras, prefix, "10steps")
    assert loras in path.parents and path.name.endswith("_10steps_00001.safetensors")


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_a_folder_link_that_points_outside_models_loras_is_refused(tmp_path):
    from tlora_pack.trainer.files import next_free_path

    loras, outside = tmp_path / "loras", tmp_path / "outside"
    loras.mkdir()
    outside.mkdir()
    (loras / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(TLoraError, match="outside"):
        next_free_path(loras, "link/run")


def test_the_trainer_refuses_a_bad_prefix_and_writes_nothing(tiny_sd15, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    with pytest.raises(TLoraError, match="prefix"):
        _train(tiny_sd15, loras, prefix="../escaped", steps=1)
    assert tree(tmp_path) == {}


def test_a_bad_prefix_is_refused_before_the_first_training_step(tiny_sd15, tmp_path, monkeypatch):
    from tlora_pack.trainer import loop

    steps, real = [], loop.TrainSampler.one_step

    def counted(self, *args):
        steps.append(1)
        return real(self, *args)

    monkeypatch.setattr(loop.TrainSampler, "one_step", counted)
    with pytest.raises(TLoraError, match="prefix"):
        _train(tiny_sd15, tmp_path, prefix="../escaped", steps=1)
    assert steps == [], "the whole run was trained, then thrown away"


# ---- saving: nothing is lost ------------------------------------------------------------------------------

@pytest.fixture
def earlier(tmp_path) -> tuple[Path, bytes]:
    """An earlier checkpoint in the output folder: it must survive every failed save byte for byte."""
    path = save_tlora(small_tlora(), tmp_path / "out" / "run_2steps_00001.safetensors")
    return path, path.read_bytes()


def _half_then(exc):
    def writer(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)  # half a file ...
        raise exc  # ... then the failure
    return writer


def _only_earlier_left(earlier):
    path, before = earlier
    assert tree(path.parent) == {path.name: before}


def test_saving_never_overwrites_an_existing_file(earlier):
    path, before = earlier
    with pytest.raises(TLoraError, match="never overwritten"):
        save_tlora(small_tlora(rank=3, min_rank=1), path)
    _only_earlier_left(earlier)


def test_a_file_that_appears_while_saving_is_not_overwritten(earlier, monkeypatch):
    path, _ = earlier
    target = path.parent / "run_00001.safetensors"
    real = fmt.save_file

    def racing_writer(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        target.write_bytes(b"someone else's file")  # another run took the name meanwhile

    monkeypatch.setattr(fmt, "save_file", racing_writer)
    with pytest.raises(TLoraError, match="never overwritten"):
        save_tlora(small_tlora(), target)
    assert target.read_bytes() == b"someone else's file"
    assert sorted(tree(path.parent)) == sorted([path.name, target.name])


def test_a_full_disk_while_writing_leaves_the_earlier_file_and_says_so(earlier, monkeypatch):
    monkeypatch.setattr(fmt, "save_file", _half_then(OSError(errno.ENOSPC, "No space left on device")))
    target = earlier[0].parent / "run_00001.safetensors"
    with pytest.raises(TLoraSaveError) as err:
        save_tlora(small_tlora(), target)
    text = str(err.value)
    assert str(target) in text and "No space left" in text and "Nothing was written" in text and "untouched" in text
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    _only_earlier_left(earlier)


def test_a_full_disk_at_flush_time_leaves_the_earlier_file(earlier, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmt.os, "fsync", full)
    with pytest.raises(TLoraSaveError, match="No space left"):
        save_tlora(small_tlora(), earlier[0].parent / "run_00001.safetensors")
    _only_earlier_left(earlier)


def test_a_full_disk_during_an_export_leaves_the_earlier_file(earlier, monkeypatch):
    from tlora_pack.tlora_core import export

    monkeypatch.setattr(export, "save_file", _half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(TLoraSaveError, match="No space left"):
        save_standard_lora(small_tlora(), earlier[0].parent / "exported_00001.safetensors")
    _only_earlier_left(earlier)


def test_a_folder_that_cannot_be_created_is_a_clear_save_error(tmp_path):
    (tmp_path / "blocker").write_bytes(b"a file where a folder should be")
    with pytest.raises(TLoraSaveError, match="could not write"):
        save_tlora(small_tlora(), tmp_path / "blocker" / "run_00001.safetensors")
    assert tree(tmp_path) == {"blocker": b"a file where a folder should be"}


@pytest.mark.parametrize("interrupt", ["KeyboardInterrupt", "Cancel"])
def test_ctrl_c_or_cancel_while_writing_leaves_the_earlier_file(comfy, earlier, monkeypatch, interrupt):
    mm = comfy.model_management
    exc = KeyboardInterrupt() if interrupt == "KeyboardInterrupt" else mm.InterruptProcessingException()
    monkeypatch.setattr(fmt, "save_file", _half_then(exc))
    with pytest.raises(type(exc)):  # passed on as it is: never turned into an error message
        save_tlora(small_tlora(), earlier[0].parent / "run_00001.safetensors")
    _only_earlier_left(earlier)


CRASH_SCRIPT = """
import os, sys, types
pack = types.ModuleType("tlora_pack"); pack.__path__ = [sys.argv[1]]; sys.modules["tlora_pack"] = pack
from tlora_pack.tlora_core import format as fmt

def dies_halfway(tensors, filename, metadata=None):
    with open(filename, "wb") as fh:
        fh.write(b"\\x00" * 100)
        fh.flush()
    os._exit(9)  # the process dies here: no finally, no cleanup

fmt.save_file = dies_halfway
fmt.write_new_file(sys.argv[2], lambda tmp: fmt.save_file({}, tmp))
"""


def test_a_crash_while_writing_leaves_the_earlier_file_and_no_file_under_the_new_name(earlier):
    target = earlier[0].parent / "run_00001.safetensors"
    done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(REPO), str(target)], capture_output=True)
    assert done.returncode == 9, done.stderr.decode()
    path, before = earlier
    assert path.read_bytes() == before and not target.exists()
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    # only a hidden temp file, which ComfyUI's LoRA lists never show (not a model file extension)
    assert len(leftovers) == 1, leftovers
    assert leftovers[0].startswith(".run_00001.safetensors.") and leftovers[0].endswith(".partial")


# ---- training that fails ---------------------------------------------------------------------------------

def _poison_loss_at(monkeypatch, call):
    from tlora_pack.trainer import loop

    real, calls = loop.loss_weights, {"n": 0}

    def poisoned(ms, sigma):
        calls["n"] += 1
        return real(ms, sigma) * (float("nan") if calls["n"] == call else 1.0)

    monkeypatch.setattr(loop, "loss_weights", poisoned)


def _train(tiny_sd15, folder, prefix="t/run", **kw):
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import train_tlora

    patcher, clip, vae = tiny_sd15
    settings = TrainSettings(**{"rank": 2, "min_rank": 1, "steps": 4, "learning_rate": 1e-3, "resolution": 64, **kw})
    return train_tlora(patcher, clip, vae, torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)),
                       None, settings, str(folder), prefix)


def test_a_diverged_run_keeps_its_last_good_file_names_it_and_the_file_loads(tiny_sd15, tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, 3)
    with pytest.raises(TLoraError) as err:
        _train(tiny_sd15, tmp_path, steps=3, save_every=1)
    last = tmp_path / "t" / "run_2steps_00001.safetensors"
    assert "not finite" in str(err.value) and f"Last good file: {last.resolve()}" in str(err.value)
    assert load_tlora(last).config.training["steps_done"] == 2
    assert sorted(tree(tmp_path / "t")) == [f"run_{n}steps_00001.safetensors{state}" for n in (1, 2)
                                            for state in ("", ".state")]  # each with its resume state


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_file_and_names_it(tiny_sd15, tmp_path, monkeypatch):
    real, calls = fmt.save_file, {"n": 0}

    def fills_up(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            return _half_then(OSError(errno.ENOSPC, "No space left on device"))(tensors, filename, metadata)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(fmt, "save_file", fills_up)
    with pytest.raises(TLoraError) as err:
        _train(tiny_sd15, tmp_path, steps=3, save_every=1)
    first = (tmp_path / "t" / "run_1steps_00001.safetensors").resolve()
    text = str(err.value)
    assert "No space left" in text and "run_2steps_00001" in text and f"Last good file: {first}" in text
    assert sorted(tree(tmp_path / "t")) == [first.name, first.name + ".state"], "the failed file's state is gone too"
    load_tlora(first)


def test_a_full_disk_at_the_final_save_names_the_last_good_file(tiny_sd15, tmp_path, monkeypatch):
    real, calls = fmt.save_file, {"n": 0}

    def fills_up(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the save at step 1, then the final one
            return _half_then(OSError(errno.ENOSPC, "No space left on device"))(tensors, filename, metadata)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(fmt, "save_file", fills_up)
    with pytest.raises(TLoraError) as err:
        _train(tiny_sd15, tmp_path, steps=2, save_every=1)
    assert "Last good file" in str(err.value) and "run_1steps_00001" in str(err.value)


def test_any_other_failure_keeps_its_type_and_the_log_names_the_last_good_file(tiny_sd15, tmp_path, monkeypatch,
                                                                               caplog):
    """An out-of-memory error, say, must reach ComfyUI as itself (its own handling applies); the log says
    what survived."""
    from tlora_pack.trainer import loop

    real, calls = loop.TrainSampler.one_step, []

    def runs_out_of_memory(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args)

    monkeypatch.setattr(loop.TrainSampler, "one_step", runs_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        _train(tiny_sd15, tmp_path, steps=4, save_every=1)
    last = (tmp_path / "t" / "run_2steps_00001.safetensors").resolve()
    assert f"Last good file: {last}." in caplog.text and "step 2 of 4" in caplog.text
    load_tlora(last)


@pytest.mark.parametrize("changes,named", [
    ({"rank": True}, "rank"), ({"min_rank": 2.0}, "r_min"), ({"exponent": True}, "exponent"),
    ({"max_timestep": False}, "max_timestep"), ({"variant": ["tlora"]}, "variant"), ({"init": None}, "init"),
    ({"base_model": 15}, "base_model"), ({"trigger": b"sks"}, "trigger"), ({"training": [1, 2]}, "training")])
def test_settings_of_the_wrong_type_are_refused_naming_the_field(changes, named):
    with pytest.raises(TLoraConfigError, match=named):
        TLoraConfig(**{"rank": 4, "min_rank": 2, **changes})
