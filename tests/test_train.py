"""Train T-LoRA from image, in-process on the tiny SD1.5 model: files, loss, masking, cancel, resume."""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfy")


def _image(seed=0, size=64):
    """A fixed synthetic photo: a bright disc on a coloured background, [1, H, W, 3] in 0..1."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.3).float()
    img = torch.stack([0.2 + 0.7 * disc, 0.4 + 0.0 * disc, 0.8 - 0.6 * disc], dim=-1)
    return img.unsqueeze(0)


def _settings(**kw):
    from tlora_pack.trainer.settings import TrainSettings
    base = dict(rank=4, min_rank=2, steps=3, learning_rate=1e-3, seed=0, resolution=64, prompt="a photo of sks dog")
    base.update(kw)
    return TrainSettings(**base)


def _train(tiny_sd15, tmp_path, **kw):
    from tlora_pack.trainer.train import train_tlora
    patcher, clip, vae = tiny_sd15
    return train_tlora(patcher, clip, vae, _image(), None, _settings(**kw), str(tmp_path), "t/run")


def test_short_run_saves_a_file_that_reloads_to_the_same_prediction(tiny_sd15, tmp_path):
    from support.predict import predict_x0
    from tlora_pack.tlora_core.format import load_tlora
    from tlora_pack.trainer.runtime import apply_tlora

    patcher, clip, _ = tiny_sd15
    result = _train(tiny_sd15, tmp_path)
    assert len(result.saved) == 1 and result.saved[0].name == "run_00001.safetensors"
    loaded = load_tlora(result.saved[0])
    assert loaded.config.training["steps_done"] == 3 and loaded.config.base_model == "SD15"
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks dog"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = float(patcher.model.model_sampling.sigmas[100])
    from_trainer, _ = apply_tlora(patcher, result.tlora, 1.0)
    from_file, _ = apply_tlora(patcher, loaded, 1.0)
    a, b = predict_x0(from_trainer, positive, x, sigma), predict_x0(from_file, positive, x, sigma)
    assert torch.equal(a, b)
    assert not torch.equal(a, predict_x0(patcher, positive, x, sigma))


def test_loss_falls_when_fitting_one_image(tiny_sd15, tmp_path):
    losses = _train(tiny_sd15, tmp_path, steps=40, learning_rate=3e-3, min_rank=4).losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_high_t_trains_only_the_first_r_t_components(tiny_sd15, tmp_path, monkeypatch):
    from tlora_pack.trainer import loop
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import find_target_layers, new_factors

    # the noisiest training sigma (t = 999): r(999) = 3 + floor(5 * 1 / 1000) = 3
    monkeypatch.setattr(loop, "draw_sigmas", lambda kind, ms, n, gen: ms.sigmas[-1:].float().cpu().expand(n))
    result = _train(tiny_sd15, tmp_path, rank=8, min_rank=3, steps=2, weight_decay=0.0, storage="fp32")
    assert result.timesteps == [999.0, 999.0], "each step's t, for the loss chart"
    patcher = tiny_sd15[0]
    init = new_factors(find_target_layers(patcher.model, "attention"),
                       TrainSettings(rank=8, min_rank=3, seed=0), True, torch.device("cpu"))
    moved_any = False
    for key, f in result.tlora.layers.items():
        f0 = init[key]
        assert torch.equal(f.down[3:], f0.down[3:]) and torch.equal(f.up[:, 3:], f0.up[:, 3:])
        assert torch.equal(f.scale[3:], f0.scale[3:])
        assert torch.equal(f.base_down, f0.base_down), "frozen factors never change"
        moved_any |= not torch.equal(f.down[:3], f0.down[:3])
    assert moved_any


def test_same_seed_gives_the_same_file_twice(tiny_sd15, tmp_path):
    from safetensors.torch import load_file
    a = _train(tiny_sd15, tmp_path / "a").saved[-1]
    b = _train(tiny_sd15, tmp_path / "b").saved[-1]
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_cancel_keeps_a_file_and_resume_finishes_the_run(tiny_sd15, tmp_path, monkeypatch):
    import comfy.model_management as mm
    from tlora_pack.tlora_core.format import load_tlora
    from tlora_pack.trainer import loop
    from tlora_pack.trainer.train import train_tlora

    done = []
    real_step = loop.TrainSampler.one_step

    def counted_step(self, *args):
        loss = real_step(self, *args)
        done.append(loss)
        return loss

    monkeypatch.setattr(loop.TrainSampler, "one_step", counted_step)

    def cancel_after_two_steps():  # what ComfyUI's Cancel button makes this call do
        if len(done) == 2:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(loop.mm, "throw_exception_if_processing_interrupted", cancel_after_two_steps)
    with pytest.raises(mm.InterruptProcessingException):
        _train(tiny_sd15, tmp_path, steps=5)
    files = sorted((tmp_path / "t").glob("*.safetensors"))
    assert [f.name for f in files] == ["run_2steps_00001.safetensors"]
    partial = load_tlora(files[0])
    assert partial.config.training["steps_done"] == 2
    monkeypatch.undo()
    patcher, clip, vae = tiny_sd15
    result = train_tlora(patcher, clip, vae, _image(), None, _settings(steps=5), str(tmp_path), "t/run",
                         resume=partial)
    assert len(result.losses) == 3 and result.tlora.config.training["steps_done"] == 5
    assert result.first_step == 3 and len(result.timesteps) == 3
    assert result.saved[-1].name == "run_00001.safetensors"


def test_training_leaves_the_input_model_unchanged(tiny_sd15, tmp_path):
    from support.predict import predict_x0
    patcher, clip, _ = tiny_sd15
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = float(patcher.model.model_sampling.sigmas[400])
    before = predict_x0(patcher, positive, x, sigma)
    flags = [p.requires_grad for p in patcher.model.parameters()]
    _train(tiny_sd15, tmp_path)
    assert torch.equal(predict_x0(patcher, positive, x, sigma), before)
    assert flags == [p.requires_grad for p in patcher.model.parameters()]


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_file(tiny_sd15, tmp_path, monkeypatch):
    from tlora_pack.tlora_core.errors import TLoraError
    from tlora_pack.trainer import loop

    real = loop.loss_weights
    calls = {"n": 0}

    def poisoned(ms, sigma):
        calls["n"] += 1
        return real(ms, sigma) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(loop, "loss_weights", poisoned)
    with pytest.raises(TLoraError, match="not finite.*run_2steps_00001"):
        _train(tiny_sd15, tmp_path, steps=4, save_every=2)
    assert (tmp_path / "t" / "run_2steps_00001.safetensors").exists()


def test_gradient_checkpointing_trains_exactly_like_plain_backprop(tiny_sd15, tmp_path, monkeypatch):
    """Checkpointed blocks re-run their forward inside backward(); the rank masks must be those of the
    step, so losses and every step's gradients match a run without checkpointing."""
    from support.grads import AdamWGradients, assert_same_gradients

    log = AdamWGradients(monkeypatch)
    plain_grads = log.run()
    plain = _train(tiny_sd15, tmp_path / "plain", steps=3, storage="fp32")
    ckpt_grads = log.run()
    ckpt = _train(tiny_sd15, tmp_path / "ckpt", steps=3, storage="fp32", gradient_checkpointing=True)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    assert_same_gradients(plain_grads, ckpt_grads)
    from tlora_pack.trainer.train import checkpoint_units
    units = checkpoint_units(tiny_sd15[0].model.diffusion_model)
    assert len(units) > 3 and all("forward" not in vars(u) for u in units), "forward is given back"


def test_saved_copies_survive_in_place_adds_and_copy_neither_frozen_weights_nor_twice():
    """For blocks that add in place after saving (Flux's `x += ...`), autograd keeps copies of what it
    saves, so the gradient is that of the same sums written out of place. The frozen weight it saves (also
    as a transposed view) is kept by reference, and a region saved again unchanged (one input, three q/k/v
    slices) shares one copy until it changes."""
    from tlora_pack.trainer.loop import SavedCopies, frozen_storages, saved_copies

    layer = torch.nn.Linear(4, 3).requires_grad_(False)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    scale = torch.linspace(0.5, 1.5, 4, requires_grad=True)

    def in_place_loss():
        a = layer(x * scale)
        out = a.sin().sum()  # sin saves a ...
        a += 1.0  # ... which then changes in place
        return out + a.pow(2).sum()

    a = layer(x * scale)
    want = torch.autograd.grad(a.sin().sum() + (a + 1.0).pow(2).sum(), scale)[0]
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(in_place_loss(), scale)
    with saved_copies(True, layer):
        loss = in_place_loss()
    assert torch.allclose(torch.autograd.grad(loss, scale)[0], want, rtol=1e-6, atol=1e-7)

    copies = SavedCopies(frozen_storages(layer))
    assert copies.pack(layer.weight.t()).data_ptr() == layer.weight.data_ptr()
    first = copies.pack(a)
    assert first.data_ptr() != a.data_ptr() and torch.equal(first, a)
    assert copies.pack(a.view(-1).view(2, 3)).data_ptr() == first.data_ptr(), "the same region: one copy"
    assert copies.pack(a[1:]).data_ptr() != first.data_ptr(), "another region: its own copy"
    a += 1.0
    changed = copies.pack(a)
    assert changed.data_ptr() != first.data_ptr() and torch.equal(changed, first + 1.0)


def test_frozen_product_on_the_weight_trains_like_two_passes(tiny_sd15, tmp_path, monkeypatch):
    """Eq. 6's frozen product B0 S0 M_t A0 folded onto the layer's weight copy (no gradient) while the
    trained product stays on the activations gives the losses and every step's gradients of the two-pass
    form, to fp32 rounding. At 128 px the self-attention projections (256 rows) take the folded path."""
    import math

    from support.grads import AdamWGradients, assert_same_gradients
    from tlora_pack.tlora_core import adapter
    from tlora_pack.trainer import runtime

    folded_calls, real = [], runtime.trained_delta
    monkeypatch.setattr(runtime, "trained_delta", lambda *a, **k: folded_calls.append(1) or real(*a, **k))
    log = AdamWGradients(monkeypatch)
    folded_grads = log.run()
    folded = _train(tiny_sd15, tmp_path / "folded", steps=2, storage="fp32", resolution=128)
    assert folded_calls, "no layer took the folded path"
    done = len(folded_calls)
    monkeypatch.setattr(adapter, "split_cost", lambda *a: math.inf)  # today's choice: two passes or dense dW
    two_pass_grads = log.run()
    two_pass = _train(tiny_sd15, tmp_path / "two_pass", steps=2, storage="fp32", resolution=128)
    assert len(folded_calls) == done
    assert folded.losses == pytest.approx(two_pass.losses, rel=1e-5)
    assert_same_gradients(two_pass_grads, folded_grads)
