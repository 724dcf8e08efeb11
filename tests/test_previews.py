"""Previews while training (in-process, tiny SD1.5): what KSampler makes with that step's file, and a
training run that is the same with or without them."""
import pytest
import torch

from test_train import _image, _settings

pytestmark = pytest.mark.usefixtures("comfy")

PROMPT = "a photo of sks dog on the beach"


def _train(tiny_sd15, folder, previews=None, **kw):
    from tlora_pack.trainer.train import train_tlora
    patcher, clip, vae = tiny_sd15
    return train_tlora(patcher, clip, vae, _image(), None, _settings(**kw), str(folder), "t/run", previews=previews)


def _ksampler_image(tiny_sd15, tlora, steps, cfg, seed):
    """Apply T-LoRA + KSampler (euler, simple) + VAE Decode, as a user would run the saved file."""
    import comfy.sample
    from tlora_pack.trainer.runtime import apply_tlora
    patcher, clip, vae = tiny_sd15
    patched, _ = apply_tlora(patcher, tlora, 1.0)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    empty = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(empty, seed)
    latent = comfy.sample.sample(patched, noise, steps, cfg, "euler", "simple", positive, negative, empty,
                                 seed=seed, disable_pbar=True)
    return vae.decode(latent).float()


def test_each_preview_is_what_ksampler_makes_with_that_steps_file(tiny_sd15, tmp_path):
    from tlora_pack.tlora_core.format import load_tlora
    from tlora_pack.trainer.preview import PreviewSettings

    look = PreviewSettings(every=2, steps=3, cfg=4.0, seed=5, prompt=PROMPT)
    result = _train(tiny_sd15, tmp_path, look, steps=4, save_every=2, storage="fp32", learning_rate=3e-3)
    assert result.previews is not None and tuple(result.previews.shape) == (2, 64, 64, 3)
    assert [p.name for p in result.saved] == ["run_2steps_00001.safetensors", "run_00001.safetensors"]
    for preview, path in zip(result.previews, result.saved):
        expected = _ksampler_image(tiny_sd15, load_tlora(path), 3, 4.0, 5)[0]
        assert torch.allclose(preview, expected, atol=1e-4), (preview - expected).abs().max()
    assert (result.previews[0] - result.previews[1]).abs().max() > 1e-3, "the adapter changed between previews"


def test_previews_leave_the_training_run_unchanged(tiny_sd15, tmp_path):
    from safetensors.torch import load_file
    from tlora_pack.trainer.preview import PreviewSettings

    plain = _train(tiny_sd15, tmp_path / "plain", steps=3)
    looked = _train(tiny_sd15, tmp_path / "looked", PreviewSettings(every=1, steps=2, cfg=3.0), steps=3)
    assert looked.previews.shape[0] == 3 and plain.previews is None
    assert looked.losses == plain.losses
    a, b = load_file(str(plain.saved[-1])), load_file(str(looked.saved[-1]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_preview_count_is_steps_over_every(tiny_sd15, tmp_path):
    from tlora_pack.trainer.preview import PreviewSettings
    result = _train(tiny_sd15, tmp_path, PreviewSettings(every=2, steps=1, cfg=1.0), steps=5)
    assert result.previews.shape[0] == 5 // 2


@pytest.mark.parametrize("field,value", [("every", -1), ("every", 1.5), ("steps", 0), ("cfg", float("nan")),
                                         ("cfg", 0.0)])
def test_bad_preview_settings_are_refused_by_name(field, value):
    from tlora_pack.tlora_core.errors import TLoraConfigError
    from tlora_pack.trainer.preview import PreviewSettings
    with pytest.raises(TLoraConfigError, match=f"preview {field}"):
        PreviewSettings(**{field: value})


def test_cancel_during_a_preview_keeps_the_steps_done(tiny_sd15, tmp_path, monkeypatch):
    """Cancel is checked at every preview step too; the steps finished before it are saved."""
    import comfy.model_management as mm
    from tlora_pack.tlora_core.format import load_tlora
    from tlora_pack.trainer import preview
    from tlora_pack.trainer.preview import PreviewSettings

    real_euler, real_check = preview.k_sampling.sample_euler, mm.throw_exception_if_processing_interrupted
    inside = []

    def euler(*args, **kwargs):
        inside.append(True)
        try:
            return real_euler(*args, **kwargs)
        finally:
            inside.pop()

    def cancel_inside_a_preview():  # what ComfyUI's Cancel button makes this call do, during the preview
        if inside:
            raise mm.InterruptProcessingException()
        real_check()

    monkeypatch.setattr(preview.k_sampling, "sample_euler", euler)
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", cancel_inside_a_preview)
    with pytest.raises(mm.InterruptProcessingException):
        _train(tiny_sd15, tmp_path, PreviewSettings(every=2, steps=3, cfg=1.0), steps=4)
    [saved] = sorted((tmp_path / "t").glob("*.safetensors"))
    assert saved.name == "run_2steps_00001.safetensors"
    assert load_tlora(saved).config.training["steps_done"] == 2


def test_without_a_clip_previews_use_the_training_conditioning_and_say_so(tiny_sd15, tmp_path, caplog):
    from tlora_pack.trainer.preview import PreviewSettings
    from tlora_pack.trainer.train import train_tlora
    patcher, clip, vae = tiny_sd15
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks dog"))
    result = train_tlora(patcher, None, vae, _image(), None, _settings(steps=2), str(tmp_path), "t/run",
                         conditioning=positive, previews=PreviewSettings(every=2, steps=2, cfg=3.0))
    assert tuple(result.previews.shape) == (1, 64, 64, 3) and torch.isfinite(result.previews).all()
    assert "no CLIP connected, so previews use the training conditioning" in caplog.text
