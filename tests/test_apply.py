"""Apply T-LoRA on a real ComfyUI model: the prediction equals W + strength * dW(t(sigma)) built by hand."""
import pytest
import torch

from support.dense import dense_delta, paper_rank

pytestmark = pytest.mark.usefixtures("comfy")

RANK, MIN_RANK = 8, 4


def _paper_rank(t, rank=RANK, min_rank=MIN_RANK):
    return paper_rank(t, rank, min_rank)


def _tlora(patcher, seed=0, rank=RANK, min_rank=MIN_RANK, variant="tlora"):
    """A T-LoRA on the tiny model's attention projections, moved away from init so dW != 0."""
    from tlora_pack.tlora_core.config import TLoraConfig
    from tlora_pack.tlora_core.format import TLora
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import find_target_layers, new_factors

    layers = find_target_layers(patcher.model, "attention")
    settings = TrainSettings(rank=rank, min_rank=min_rank, seed=seed, variant=variant)
    config = TLoraConfig(rank=rank, min_rank=min_rank, variant=variant, base_model="SD15")
    factors = new_factors(layers, settings, config.ortho, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed + 100)
    for f in factors.values():
        f.down = f.down + 0.05 * torch.randn(f.down.shape, generator=gen)
        f.up = f.up + 0.05 * torch.randn(f.up.shape, generator=gen)
        if f.scale is not None:
            f.scale = f.scale + 0.01 * torch.rand(f.scale.shape, generator=gen)
    return TLora(config, factors)



def _reference_patcher(patcher, deltas_by_key):
    """A separate fp32 model that ComfyUI builds from a state dict holding W + dW, W read from
    `patcher`'s unpatched weights in whatever dtype they are stored (no T-LoRA code involved).

    Built from the weights, not by copying the model object: ComfyUI's model classes are not meant to
    be deep-copied (0.33's model config answers None for any missing attribute, __setstate__ included).
    """
    import comfy.model_management
    import comfy.sd
    comfy.model_management.unload_all_models()  # whatever a test loaded patched is put back to W
    # copies: the new model must share no tensor with the session's model
    state = {f"model.diffusion_model.{k}": v.to(torch.float32, copy=True)
             for k, v in patcher.model.diffusion_model.state_dict().items()}
    for key, dw in deltas_by_key.items():  # key: the module path below the model, "diffusion_model...."
        state[f"model.{key}.weight"] = state[f"model.{key}.weight"] + dw.float()
    reference, _, _, _ = comfy.sd.load_state_dict_guess_config(
        state, output_vae=False, output_clip=False, model_options={"dtype": torch.float32})
    return reference


@pytest.fixture(scope="module")
def setup(tiny_sd15):
    patcher, clip, _ = tiny_sd15
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks dog"))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return patcher, positive, x


@pytest.fixture(params=["weight", "activations", "cost rule"])
def path(request, monkeypatch):
    """Which way uniform calls add dW: forced onto the weight, forced onto the activations, or the
    FLOP rule; yields a counter of activation-path deltas so a test can check the path was taken."""
    from tlora_pack.trainer import runtime as rt
    if request.param != "cost rule":
        monkeypatch.setattr(rt, "activations_cheaper", lambda *a: request.param == "activations")
    calls = []
    real = rt.stacked_delta
    monkeypatch.setattr(rt, "stacked_delta", lambda *a, **k: calls.append(1) or real(*a, **k))
    return request.param, calls


def _predict_on(path, patched, positive, x, sigma):
    """The prediction, checking that the path asked for was taken."""
    from support.predict import predict_x0
    name, calls = path
    calls.clear()
    out = predict_x0(patched, positive, x, sigma)
    assert (len(calls) > 0) == (name != "weight"), f"{name} path not taken"
    return out


@pytest.mark.parametrize("t_index", [0, 1, 250, 500, 998, 999])
def test_prediction_matches_dense_reference_at_each_sigma(setup, path, t_index):
    from support.predict import predict_x0
    from tlora_pack.trainer.runtime import apply_tlora

    patcher, positive, x = setup
    tlora = _tlora(patcher)
    sigma = float(patcher.model.model_sampling.sigmas[t_index])
    strength = 0.8
    patched, _ = apply_tlora(patcher, tlora, strength)
    got = _predict_on(path, patched, positive, x, sigma)
    keep = _paper_rank(t_index)
    ref = _reference_patcher(patcher, {k: strength * dense_delta(f, keep) for k, f in tlora.layers.items()})
    want = predict_x0(ref, positive, x, sigma)
    base = predict_x0(patcher, positive, x, sigma)
    assert (want - base).norm() / base.norm() > 1e-3, "the T-LoRA must visibly change the prediction"
    assert (got - want).norm() / want.norm() < 1e-4


def test_untrained_tlora_leaves_every_prediction_exactly_unchanged(setup, path):
    """Eq. 6 at step 0: the frozen initial product cancels exactly, on either path, at every t."""
    from support.predict import predict_x0
    from tlora_pack.tlora_core.config import TLoraConfig
    from tlora_pack.tlora_core.format import TLora
    from tlora_pack.trainer.runtime import apply_tlora
    from tlora_pack.trainer.settings import TrainSettings
    from tlora_pack.trainer.train import find_target_layers, new_factors

    patcher, positive, x = setup
    layers = find_target_layers(patcher.model, "attention")
    config = TLoraConfig(rank=RANK, min_rank=MIN_RANK, base_model="SD15")
    tlora = TLora(config, new_factors(layers, TrainSettings(rank=RANK, min_rank=MIN_RANK), True, torch.device("cpu")))
    patched, _ = apply_tlora(patcher, tlora, 1.0)
    for t_index in (0, 500, 999):
        sigma = float(patcher.model.model_sampling.sigmas[t_index])
        assert torch.equal(_predict_on(path, patched, positive, x, sigma), predict_x0(patcher, positive, x, sigma))


def test_rows_with_different_sigmas_get_their_own_masks(setup):
    from support.predict import predict_x0
    from tlora_pack.trainer.runtime import apply_tlora

    patcher, positive, x = setup
    patched, _ = apply_tlora(patcher, _tlora(patcher), 1.0)
    sig = patcher.model.model_sampling.sigmas
    pair = predict_x0(patched, positive, x.repeat(2, 1, 1, 1), torch.stack([sig[999], sig[0]]))
    high = predict_x0(patched, positive, x, sig[999])
    low = predict_x0(patched, positive, x, sig[0])
    # Mixed rows run on activations, single rows on the merged weight: equal up to float rounding.
    assert (pair[0:1] - high).norm() / high.norm() < 1e-5
    assert (pair[1:2] - low).norm() / low.norm() < 1e-5
    assert (high - low).norm() / low.norm() > 1e-3


def test_strength_zero_and_unpatched_model_give_the_base_output_exactly(setup):
    from support.predict import predict_x0
    from tlora_pack.trainer.runtime import apply_tlora

    patcher, positive, x = setup
    sigma = float(patcher.model.model_sampling.sigmas[500])
    before = predict_x0(patcher, positive, x, sigma)
    zero, _ = apply_tlora(patcher, _tlora(patcher), 0.0)
    assert torch.equal(predict_x0(zero, positive, x, sigma), before)
    full, _ = apply_tlora(patcher, _tlora(patcher), 1.0)
    assert not torch.equal(predict_x0(full, positive, x, sigma), before)
    assert torch.equal(predict_x0(patcher, positive, x, sigma), before), "the input MODEL must stay unchanged"


def test_two_tloras_stack_each_with_its_own_schedule(setup):
    from support.predict import predict_x0
    from tlora_pack.trainer.runtime import apply_tlora

    patcher, positive, x = setup
    first, second = _tlora(patcher, seed=1), _tlora(patcher, seed=2, rank=6, min_rank=2)
    t = 700
    sigma = float(patcher.model.model_sampling.sigmas[t])
    stacked, _ = apply_tlora(patcher, first, 1.0)
    stacked, _ = apply_tlora(stacked, second, 0.5)
    got = predict_x0(stacked, positive, x, sigma)
    deltas = {k: dense_delta(f, _paper_rank(t)) + 0.5 * dense_delta(second.layers[k], _paper_rank(t, 6, 2))
              for k, f in first.layers.items()}
    want = predict_x0(_reference_patcher(patcher, deltas), positive, x, sigma)
    assert (got - want).norm() / want.norm() < 1e-4


def test_stacks_with_an_ordinary_lora_from_loraloader(setup):
    import comfy.sd
    from support.predict import predict_x0
    from tlora_pack.trainer.runtime import apply_tlora

    patcher, positive, x = setup
    tlora = _tlora(patcher)
    key = next(iter(tlora.layers))
    weight = patcher.model.get_submodule(key).weight
    gen = torch.Generator().manual_seed(5)
    up, down = 0.05 * torch.randn(weight.shape[0], 2, generator=gen), 0.05 * torch.randn(2, weight.shape[1], generator=gen)
    lora = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)}
    with_lora, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    both, _ = apply_tlora(with_lora, tlora, 1.0)
    t = 300
    sigma = float(patcher.model.model_sampling.sigmas[t])
    deltas = {k: dense_delta(f, _paper_rank(t)) for k, f in tlora.layers.items()}
    deltas[key] = deltas[key] + up @ down
    want = predict_x0(_reference_patcher(patcher, deltas), positive, x, sigma)
    got = predict_x0(both, positive, x, sigma)
    assert (got - want).norm() / want.norm() < 1e-4


def test_flow_models_use_t_equal_1000_sigma():
    import comfy.model_sampling as ms
    from tlora_pack.trainer.timesteps import timesteps_from_sigmas

    class Flux(ms.ModelSamplingFlux, ms.CONST):
        pass

    class SD3(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    sigma = torch.tensor([1.0, 0.5, 0.25, 0.0])
    for sampling in (Flux(), SD3()):
        assert torch.allclose(timesteps_from_sigmas(sampling, sigma), torch.tensor([1000.0, 500.0, 250.0, 0.0]))


def test_t_follows_a_model_sampling_replaced_after_apply(setup):
    """ModelSampling* nodes swap model_sampling through an object patch: the mask must use the new one."""
    import comfy.model_sampling as ms
    from support.predict import predict_x0
    from tlora_pack.trainer.runtime import apply_tlora

    patcher, positive, x = setup
    patched, runtime = apply_tlora(patcher, _tlora(patcher), 1.0)
    original = patcher.model.model_sampling

    class Other(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    other = Other()
    other._register_schedule(beta_schedule="linear", linear_start=0.0001, linear_end=0.02)
    patched.add_object_patch("model_sampling", other)
    seen = []
    real = runtime.masks_for
    runtime.masks_for = lambda t, device: seen.append(t.tolist()) or real(t, device)
    predict_x0(patched, positive, x, float(other.sigmas[300]))
    old_t = int(original.timestep(other.sigmas[300:301]))
    assert seen == [[300.0]] and old_t != 300


def _stock_lora_at(tlora, keep):
    """An ordinary LoRA (lora_up/lora_down/alpha) equal to dW at a prefix mask, built by hand."""
    sd = {}
    for key, f in tlora.layers.items():
        g, g0 = f.scale.clone(), f.base_scale.clone()
        g[keep:], g0[keep:] = 0, 0
        sd[f"{key}.lora_up.weight"] = torch.cat([f.up * g, -f.base_up * g0], dim=1)
        sd[f"{key}.lora_down.weight"] = torch.cat([f.down, f.base_down])
        sd[f"{key}.alpha"] = torch.tensor(float(2 * f.rank))
    return sd


def test_ksampler_run_equals_stock_lora_stepped_at_each_steps_rank(setup):
    """Euler + CFG over 6 steps with Apply T-LoRA equals 6 single steps, each with ComfyUI's stock LoRA
    loader holding the update at r(t) of that step's sigma."""
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    from tlora_pack.trainer.runtime import apply_tlora

    patcher, positive, _ = setup
    negative = positive
    tlora = _tlora(patcher, seed=3)
    steps, cfg = 6, 5.0
    latent = torch.zeros(1, 4, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    patched, _ = apply_tlora(patcher, tlora, 1.0)
    got = comfy.sample.sample(patched, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                              disable_pbar=True, seed=0)

    sampling = patcher.model.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", steps)
    x = latent
    for i in range(steps):
        keep = _paper_rank(int(sampling.timestep(sigmas[i])))
        stepped, _ = comfy.sd.load_lora_for_models(patcher, None, _stock_lora_at(tlora, keep), 1.0, 0.0)
        x = comfy.sample.sample(stepped, noise if i == 0 else torch.zeros_like(noise), steps, cfg, "euler", "normal",
                                positive, negative, x, disable_noise=i > 0, start_step=i, last_step=i + 1,
                                force_full_denoise=i == steps - 1, disable_pbar=True, seed=0)
    base = comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=0)
    assert (x - base).norm() / base.norm() > 1e-3
    assert (got - x).norm() / x.norm() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_and_bf16_base_weights_give_w_plus_dw_and_stay_unchanged(setup, tiny_sd15_checkpoint, dtype):
    import comfy.sd
    from support.predict import predict_x0
    from tlora_pack.trainer.runtime import apply_tlora

    _, positive, x = setup
    low, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_checkpoint), model_options={"dtype": dtype})
    assert low.model.diffusion_model.input_blocks[0][0].weight.dtype == dtype
    tlora = _tlora(low)
    sigma = float(low.model.model_sampling.sigmas[400])
    before = predict_x0(low, positive, x, sigma)
    got = predict_x0(apply_tlora(low, tlora, 1.0)[0], positive, x, sigma)
    deltas = {k: dense_delta(f, _paper_rank(400)) for k, f in tlora.layers.items()}
    want = predict_x0(_reference_patcher(low, deltas), positive, x, sigma)
    assert (want - before).norm() / before.norm() > 1e-3
    assert (got - want).norm() / want.norm() < 1e-4
    assert torch.equal(predict_x0(low, positive, x, sigma), before), "the unpatched model must be unchanged"


def test_low_vram_partial_loading_gives_the_same_prediction(setup, monkeypatch):
    """ComfyUI's low-VRAM mode keeps weights offloaded and patches them per forward through
    weight_function (LowVramPatch); a T-LoRA stacked with a stock LoRA must give the fully loaded result."""
    import comfy.model_management as mm
    import comfy.sd
    from support.predict import predict_x0
    from tlora_pack.trainer.runtime import apply_tlora

    patcher, positive, x = setup
    tlora = _tlora(patcher)
    key = next(iter(tlora.layers))
    weight = patcher.model.get_submodule(key).weight
    gen = torch.Generator().manual_seed(9)
    lora = {f"{key}.lora_up.weight": 0.05 * torch.randn(weight.shape[0], 2, generator=gen),
            f"{key}.lora_down.weight": 0.05 * torch.randn(2, weight.shape[1], generator=gen)}
    both, _ = apply_tlora(comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)[0], tlora, 1.0)
    sigma = float(patcher.model.model_sampling.sigmas[700])
    full = predict_x0(both, positive, x, sigma)
    assert not patcher.model.model_lowvram
    mm.unload_all_models()
    # Treat the CPU as a device without VRAM to spare: ComfyUI then loads (almost) nothing up front.
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    partial = predict_x0(both, positive, x, sigma)
    assert patcher.model.model_lowvram, "the model was not partially loaded"
    assert (partial - full).norm() / full.norm() < 1e-5


def _count_cast_path_entries(monkeypatch, modules):
    """Counts, per adapted Linear, the calls that enter ComfyUI's cast path (forward_comfy_cast_weights:
    the path that copies the whole weight when a weight function is registered)."""
    entries = {id(m): 0 for m in modules}
    for cls in {type(m) for m in modules}:
        real = cls.forward_comfy_cast_weights

        def counted(self, *args, _real=real, **kwargs):
            if id(self) in entries:
                entries[id(self)] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward_comfy_cast_weights", counted)
    return entries


def test_activations_path_calls_skip_the_weight_copy_and_match_the_dense_reference(setup, path, monkeypatch):
    """A call in which no adapter of a Linear adds dW on the weight runs that Linear without the pack's
    weight function, so ComfyUI's op takes its plain path (no whole-weight copy); a weight-path call goes
    through the cast path with the function; both give W + dW(t); the lists are as injected afterwards."""
    from support.predict import predict_x0
    from tlora_pack.trainer import runtime as rt

    patcher, positive, x = setup
    tlora = _tlora(patcher)
    patched, runtime = rt.apply_tlora(patcher, tlora, 1.0)
    modules = [patcher.model.get_submodule(p) for p in runtime.weight_functions]
    assert not any(m.comfy_cast_weights for m in modules), "fp32 on the CPU: ComfyUI's ops take the plain path"
    entries = _count_cast_path_entries(monkeypatch, modules)
    calls = []
    real_call = rt.SharedWeightFunction.__call__
    monkeypatch.setattr(rt.SharedWeightFunction, "__call__", lambda self, w: calls.append(1) or real_call(self, w))
    t = 300
    sigma = float(patcher.model.model_sampling.sigmas[t])
    got = _predict_on(path, patched, positive, x, sigma)
    for m, functions in zip(modules, runtime.weight_functions.values()):  # still loaded, as injected
        assert not hasattr(m, rt.SUSPENDED)
        assert [f for f in m.weight_function if isinstance(f, rt.SharedWeightFunction)] == functions
    entered = sum(n > 0 for n in entries.values())
    if path[0] == "activations":
        assert entered == 0 and not calls, f"{entered} adapted Linears copied their weight on the activations path"
    elif path[0] == "weight":
        assert entered == len(modules) and len(calls) == sum(entries.values())
    else:  # the FLOP rule at 16x16 latents: some layers on each path
        assert 0 < entered < len(modules) and len(calls) == sum(entries.values())
    ref = _reference_patcher(patcher, {k: dense_delta(f, _paper_rank(t)) for k, f in tlora.layers.items()})
    want = predict_x0(ref, positive, x, sigma)
    assert (want - predict_x0(patcher, positive, x, sigma)).norm() / want.norm() > 1e-3
    assert (got - want).norm() / want.norm() < 1e-4


def test_suspended_weight_functions_leave_other_entries_and_come_back_in_any_order():
    """Only the runtime's own functions leave a Linear's list for a call (a low-VRAM patch or another
    T-LoRA's function stays, in order); two runtimes stacked on one Linear may resume in either order."""
    from tlora_pack.trainer.runtime import SUSPENDED, resume_weight_functions, suspend_weight_functions

    def low_vram(w):
        return w

    def ours_a(w):
        return w

    def ours_b(w):
        return w
    for order in ((ours_a, ours_b), (ours_b, ours_a)):
        module = torch.nn.Linear(2, 2)
        full = [low_vram, ours_a, ours_b]
        module.weight_function = full
        suspend_weight_functions(module, [ours_a])
        assert module.weight_function == [low_vram, ours_b]
        suspend_weight_functions(module, [ours_b])
        assert module.weight_function == [low_vram]
        resume_weight_functions(module, [order[0]])
        assert module.weight_function == [low_vram, order[0]]
        resume_weight_functions(module, [order[1]])
        assert module.weight_function is full and not hasattr(module, SUSPENDED)


def test_weight_functions_come_back_when_the_forward_raises(setup, monkeypatch):
    """The gate's restoring hook is always called: a forward that raises (e.g. an interrupted run) leaves
    the Linear's list as it was injected."""
    from support.predict import predict_x0
    from tlora_pack.trainer import runtime as rt

    patcher, positive, x = setup
    patched, runtime = rt.apply_tlora(patcher, _tlora(patcher), 1.0)
    monkeypatch.setattr(rt, "activations_cheaper", lambda *a: True)
    path = next(iter(runtime.weight_functions))
    module = patcher.model.get_submodule(path)
    seen = []

    def raising(*args, **kwargs):
        seen.append(list(module.weight_function))
        raise RuntimeError("stop")
    monkeypatch.setattr(module, "forward", raising)
    with pytest.raises(RuntimeError, match="stop"):
        predict_x0(patched, positive, x, float(patcher.model.model_sampling.sigmas[500]))
    mine = runtime.weight_functions[path][0]
    assert seen and not any(f is mine for f in seen[0]), "the call ran with the function taken off"
    assert any(f is mine for f in module.weight_function) and not hasattr(module, rt.SUSPENDED)
