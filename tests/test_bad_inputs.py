"""Inputs that used to give a silent wrong result or a raw error: each is refused with a message that names the
problem and the fix, and a refused run writes nothing. In-process, on the tiny SD1.5 model."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tlora_pack.tlora_core import format as fmt
from tlora_pack.tlora_core.config import TLoraConfig
from tlora_pack.tlora_core.errors import TLoraConfigError, TLoraError, TLoraFormatError
from tlora_pack.tlora_core.init import ortho_factors


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ---- strength / r_min / exponent in Apply and Load ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tlora(tiny_sd15):
    from tlora_pack.tlora_core.format import TLora
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import find_target_layers, new_factors

    layers = find_target_layers(tiny_sd15[0].model, "attention")
    factors = new_factors(layers, TrainSettings(rank=2, min_rank=1, variant="lora"), False, torch.device("cpu"))
    return TLora(TLoraConfig(rank=2, min_rank=1, variant="vanilla_tlora", base_model="SD15"), factors)


NAN, INF = float("nan"), float("inf")
BAD_OVERRIDES = [
    (dict(strength=NAN), "strength must be a finite number, got nan; use 1"),
    (dict(strength=INF), "strength must be a finite number, got inf"),
    (dict(strength=-INF), "strength must be a finite number, got -inf"),
    (dict(min_rank=NAN), "r_min must be a whole number, got nan"),
    (dict(min_rank=INF), "r_min must be a whole number, got inf"),
    (dict(exponent=NAN), "schedule exponent must be a finite number > 0, got nan"),
    (dict(exponent=INF), "schedule exponent must be a finite number > 0, got inf"),
]


@pytest.mark.parametrize("changes, message", BAD_OVERRIDES)
def test_apply_tlora_refuses_non_finite_strength_r_min_and_exponent(tiny_sd15, tiny_tlora, changes, message):
    from tlora_pack.trainer.runtime import apply_tlora

    args = {**dict(strength=1.0, min_rank=None, exponent=None), **changes}
    with pytest.raises(TLoraError, match=message):
        apply_tlora(tiny_sd15[0], tiny_tlora, args.pop("strength"), **args)


@pytest.mark.parametrize("changes, message", [c for c in BAD_OVERRIDES if "min_rank" not in c[0]])
def test_both_nodes_refuse_non_finite_strength_and_exponent(tiny_sd15, tiny_tlora, tmp_path, monkeypatch, changes,
                                                            message):
    """Through the nodes' execute (ComfyUI's own checks let NaN through: NaN < min and NaN > max are False)."""
    import folder_paths
    from tlora_pack.nodes.apply import TLoraApply, TLoraLoad

    path = fmt.save_tlora(tiny_tlora, tmp_path / "t.safetensors")
    monkeypatch.setattr(folder_paths, "get_full_path_or_raise", lambda kind, name: str(path))
    inputs = dict(strength=1.0, min_rank=0, exponent=0.0)
    inputs.update(changes)
    with pytest.raises(TLoraError, match=message):
        TLoraApply.execute(tiny_sd15[0], tiny_tlora, **inputs)
    with pytest.raises(TLoraError, match=message) as err:
        TLoraLoad.execute(tiny_sd15[0], "t.safetensors", **inputs)
    assert str(path) not in str(err.value), "the file is not at fault"


# ---- images and masks -----------------------------------------------------------------------------------

def _image(size=64):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.3).float()
    return torch.stack([0.2 + 0.7 * disc, 0.4 + 0.0 * disc, 0.8 - 0.6 * disc], dim=-1).unsqueeze(0)


def _train(tiny_sd15, folder, image, mask, prefix="t/run", **kw):
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import train_tlora

    patcher, clip, vae = tiny_sd15
    settings = TrainSettings(**{**dict(rank=2, min_rank=1, steps=1, resolution=64), **kw})
    return train_tlora(patcher, clip, vae, image, mask, settings, str(folder), prefix)


def _with(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


wide = torch.zeros(1, 64, 128)
wide[:, :, :16] = 1.0  # the subject at the far left: outside the centred 64 px square


@pytest.mark.parametrize("image, mask, message", [
    (_with(_image(), 5, NAN), None, "the IMAGE holds NaN or infinite values.*Connect the image straight from"),
    (_with(_image(), 5, INF), None, "the IMAGE holds NaN or infinite values"),
    (_image(), _with(torch.ones(1, 64, 64), 7, NAN), "the MASK holds NaN or infinite values.*values from 0"),
    (_image(), torch.zeros(1, 64, 64), "the MASK is all zero.*Paint the subject white.*or disconnect the mask"),
    (_image().repeat(2, 1, 1, 1), torch.stack([torch.ones(64, 64), torch.zeros(64, 64)]),
     "mask 2 of 2 is all zero"),
    (torch.rand(1, 64, 128, 3), wide, "covers nothing inside the centred square crop.*Crop the image"),
])
def test_bad_images_and_masks_are_refused_and_nothing_is_written(tiny_sd15, tmp_path, image, mask, message):
    with pytest.raises(TLoraError, match=message):
        _train(tiny_sd15, tmp_path, image, mask)
    assert _files(tmp_path) == []


# ---- files and names ------------------------------------------------------------------------------------

def test_a_16bit_file_whose_residual_rank_differs_from_its_frozen_factor_is_named_not_a_raw_error(tmp_path):
    f = ortho_factors(6, 4, 3, seed=1, layer_key="l")
    tl = fmt.TLora(TLoraConfig(rank=3, min_rank=1), {"l": f})
    tensors = fmt.to_state_dict(tl, torch.float16)
    tensors["l.tlora_down"] = tensors["l.tlora_down"][:2].contiguous()  # rank 2 residual over a rank 3 base
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=fmt.metadata_for(tl, "fp16"))
    with pytest.raises(TLoraFormatError, match=r"layer 'l' in .*bad.safetensors: down has shape \(2, 6\) but "
                                               r"base_down has \(3, 6\).*use the file the trainer wrote"):
        fmt.load_tlora(path)


@pytest.mark.parametrize("value", [10 ** 30, 1e30, 0, 100_001])
def test_an_absurd_max_timestep_is_refused_when_the_file_is_read(tmp_path, value):
    with pytest.raises(TLoraConfigError, match="max_timestep = .*T must be a whole number from 1 to 100000"):
        TLoraConfig(max_timestep=value)
    tl = fmt.TLora(TLoraConfig(rank=3, min_rank=1), {"l": ortho_factors(6, 4, 3, seed=1, layer_key="l")})
    meta = fmt.metadata_for(tl, "fp32")
    meta["tlora.config"] = json.dumps({**json.loads(meta["tlora.config"]), "max_timestep": value})
    path = tmp_path / "t.safetensors"
    save_file(fmt.to_state_dict(tl), str(path), metadata=meta)
    with pytest.raises(TLoraFormatError, match=r"t.safetensors: max_timestep = .*Set it to 1000"):
        fmt.load_tlora(path)


def test_a_very_long_prefix_is_refused_before_training_and_nothing_is_written(tiny_sd15, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    long_prefix = "/".join(["folder" * 30] * 30)  # every name is short enough, the whole path is not
    with pytest.raises(TLoraError, match="is 5429 bytes long; keep the whole prefix, folders included, under 1000"):
        _train(tiny_sd15, loras, _image(), None, prefix=long_prefix)
    assert _files(tmp_path) == []


def test_a_path_the_os_refuses_is_a_clear_error_not_enametoolong(tmp_path):
    from tlora_pack.trainer.files import next_free_path

    deep = tmp_path
    while len(os.fsencode(deep)) < 3300:  # a models folder deep enough that folder + prefix > 4096 bytes
        deep = deep / ("d" * 150)
    deep.mkdir(parents=True)
    prefix = "/".join(["p" * 150] * 6)  # 905 bytes: within the prefix limit
    with pytest.raises(TLoraError, match="gives a path under .* that the file system refuses .File name too long.; "
                                         "choose a shorter prefix"):
        next_free_path(deep, prefix)


# ---- how errors show in ComfyUI -------------------------------------------------------------------------

def test_the_pack_errors_have_a_plain_type_name_for_comfyui():
    """ComfyUI shows `<module>.<class>` unless the module is builtins; a custom node's module is its folder path."""
    from tlora_pack.tlora_core import errors

    for cls in (errors.TLoraError, errors.TLoraConfigError, errors.TLoraFormatError, errors.TLoraSaveError):
        module = cls.__module__
        shown = cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"  # execution.py's rule
        assert shown == cls.__name__
