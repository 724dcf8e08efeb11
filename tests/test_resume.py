"""Exact resume, in-process on the tiny SD1.5 model: a run continued from its file at step k equals the
uninterrupted run bit for bit (factors, the optimiser's state: AdamW's or Prodigy's, RNG), and mismatched
resumes are refused by name."""
import logging

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("comfy")


def _image(shift=0.0, size=64):
    """A fixed synthetic photo: a bright disc on a coloured background, [1, H, W, 3] in 0..1."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.3).float()
    img = torch.stack([0.2 + 0.7 * disc, 0.4 + shift + 0.0 * disc, 0.8 - 0.6 * disc], dim=-1)
    return img.unsqueeze(0)


def _train(tiny_sd15, folder, resume=None, image=None, **kw):
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import train_tlora

    settings = dict(rank=4, min_rank=2, steps=4, learning_rate=1e-3, seed=0, resolution=64)
    settings.update(kw)
    patcher, clip, vae = tiny_sd15
    return train_tlora(patcher, clip, vae, _image() if image is None else image, None, TrainSettings(**settings),
                       str(folder), "t/run", resume=resume)


def _load_like_a_node(path):
    """What Load T-LoRA hands on: the file read under ComfyUI's inference mode."""
    from tlora_pack.tlora_core.readers import read_any
    with torch.inference_mode():
        return read_any(path)


def _same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


@pytest.fixture(scope="session")
def uninterrupted(tiny_sd15, tmp_path_factory):
    """4 steps with a save at step 2: the reference run, and its step-2 file."""
    folder = tmp_path_factory.mktemp("full")
    result = _train(tiny_sd15, folder, save_every=2)
    assert [p.name for p in result.saved] == ["run_2steps_00001.safetensors", "run_00001.safetensors"]
    return result


def test_resume_from_a_save_every_file_equals_the_uninterrupted_run(tiny_sd15, uninterrupted, tmp_path):
    from tlora_pack.trainer.files import state_path

    two_steps, full = uninterrupted.saved
    resumed = _train(tiny_sd15, tmp_path, resume=_load_like_a_node(two_steps))
    assert len(resumed.losses) == 2 and resumed.losses == uninterrupted.losses[2:]
    _same_tensors(resumed.saved[-1], full)  # fp16 file: the state's float32 factors made it exact
    _same_tensors(state_path(resumed.saved[-1]), state_path(full))  # moments, RNG and losses as well
    state = load_file(str(state_path(full)))
    assert state["losses"].tolist() == uninterrupted.losses
    assert any(k.endswith(".exp_avg_sq") for k in state) and state["rng"].dtype == torch.uint8


def test_a_prodigy_run_with_clipping_resumes_bit_for_bit(tiny_sd15, tmp_path):
    """Prodigy keeps a step-size estimate per group and p0 / s per factor: the sidecar holds them, so a run
    continued at step 2 equals the uninterrupted one exactly (file, state, losses)."""
    from tlora_pack.trainer.files import state_path

    full = _train(tiny_sd15, tmp_path / "full", optimizer="prodigy", learning_rate=1.0, max_grad_norm=1.0,
                  save_every=2)
    resumed = _train(tiny_sd15, tmp_path / "resumed", optimizer="prodigy", learning_rate=1.0, max_grad_norm=1.0,
                     resume=_load_like_a_node(full.saved[0]))
    assert resumed.losses == full.losses[2:]
    _same_tensors(resumed.saved[-1], full.saved[-1])
    _same_tensors(state_path(resumed.saved[-1]), state_path(full.saved[-1]))
    state = load_file(str(state_path(full.saved[-1])))
    assert any(k.endswith(".p0") for k in state) and any(k.endswith(".s") for k in state)


def test_another_optimisers_state_is_not_used_and_the_log_says_so(tiny_sd15, uninterrupted, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        resumed = _train(tiny_sd15, tmp_path, optimizer="prodigy", learning_rate=1.0,
                         resume=_load_like_a_node(uninterrupted.saved[0]))
    assert "holds adamw's state but this run uses prodigy" in caplog.text
    assert resumed.tlora.config.training["optimizer"] == "prodigy"


def test_train_to_train_and_a_cancelled_file_resume_exactly(tiny_sd15, uninterrupted, tmp_path, monkeypatch):
    import comfy.model_management as mm
    from tlora_pack.trainer import loop

    first = _train(tiny_sd15, tmp_path / "a", steps=1)  # Train -> Train: the result's T-LoRA as the next input
    second = _train(tiny_sd15, tmp_path / "b", steps=2, resume=first.tlora)
    done, real_step = [], loop.TrainSampler.one_step

    def counted_step(self, *args):
        done.append(real_step(self, *args))
        return done[-1]

    def cancel_after_step_three():  # what ComfyUI's Cancel button makes this call do
        if len(done) == 1:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(loop.TrainSampler, "one_step", counted_step)
    monkeypatch.setattr(loop.mm, "throw_exception_if_processing_interrupted", cancel_after_step_three)
    with pytest.raises(mm.InterruptProcessingException):
        _train(tiny_sd15, tmp_path / "c", steps=4, resume=second.tlora)
    monkeypatch.undo()
    cancelled = tmp_path / "c" / "t" / "run_3steps_00001.safetensors"
    resumed = _train(tiny_sd15, tmp_path / "d", resume=_load_like_a_node(cancelled))
    assert len(resumed.losses) == 1 and resumed.losses == uninterrupted.losses[3:]
    _same_tensors(resumed.saved[-1], uninterrupted.saved[-1])


def test_a_file_without_state_resumes_with_a_fresh_optimiser_and_says_so(tiny_sd15, uninterrupted, tmp_path,
                                                                         caplog):
    import shutil
    two_steps = tmp_path / "old.safetensors"
    shutil.copyfile(uninterrupted.saved[0], two_steps)  # no sidecar beside the copy
    with caplog.at_level(logging.WARNING):
        resumed = _train(tiny_sd15, tmp_path, resume=_load_like_a_node(two_steps))
    assert "has no optimiser state" in caplog.text and "starts fresh" in caplog.text
    assert len(resumed.losses) == 2 and resumed.tlora.config.training["steps_done"] == 4


@pytest.mark.parametrize("change, message", [
    (dict(rank=8, min_rank=4), "cannot resume a tlora rank 4 T-LoRA as a tlora rank 8 one"),
    (dict(variant="lora"), "cannot resume a tlora rank 4 T-LoRA as a lora rank 4 one"),
    (dict(image=_image(shift=0.1)), r"trained on images 1x 64x64 px #\w+, this run has 1x 64x64 px #\w+"),
    (dict(base_model="SDXL"), "cannot resume a T-LoRA trained on SDXL with a SD15 model"),
])
def test_a_mismatched_resume_is_refused_naming_both_values(tiny_sd15, uninterrupted, tmp_path, change, message):
    from tlora_pack.tlora_core.errors import TLoraError

    resume = _load_like_a_node(uninterrupted.saved[0])
    if "base_model" in change:
        resume.config = resume.config.replace(base_model=change.pop("base_model"))
    with pytest.raises(TLoraError, match=message):
        _train(tiny_sd15, tmp_path, resume=resume, **change)
    assert not list(tmp_path.rglob("*")), "a refused run writes nothing"
