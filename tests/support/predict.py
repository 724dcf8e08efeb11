"""One model evaluation through ComfyUI's real sampling path (guider, conds, wrappers, injections)."""
import torch

import comfy.samplers


class _OneCall(comfy.samplers.Sampler):
    """A 'sampler' that evaluates the model once at the given sigmas and returns the x0 prediction."""

    def __init__(self, sigma):
        self.sigma = sigma

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        return model_wrap(noise, self.sigma.to(noise.device), **extra_args)


def predict_x0(patcher, positive, x, sigma):
    """The model's x0 prediction for input x at per-row sigmas, with CFG 1 (cond only)."""
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    # The guider scales a non-zero latent on the way in and out; a zero latent passes straight through.
    out = guider.sample(x, torch.zeros_like(x), _OneCall(sigma), torch.tensor([1.0, 0.0]), seed=0,
                        disable_pbar=True)
    return patcher.model.process_latent_in(out)
