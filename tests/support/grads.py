"""The gradients every AdamW step of a training run starts from, recorded for comparisons.

Training runs are compared by their gradients, not their factors: AdamW's first steps move each entry by
about lr * sign(grad), which turns round-off in near-zero gradients into lr-sized differences.
"""
import torch


class AdamWGradients:
    """Patches AdamW.step once; `run()` starts a new list that receives, at each step, all the
    optimizer's parameter gradients as one flat tensor."""

    def __init__(self, monkeypatch):
        self.runs: list[list] = []
        real_step = torch.optim.AdamW.step

        def step(opt, *args, **kwargs):
            self.runs[-1].append(torch.cat([p.grad.detach().reshape(-1).clone() for group in opt.param_groups
                                            for p in group["params"] if p.grad is not None]))
            return real_step(opt, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)

    def run(self) -> list:
        self.runs.append([])
        return self.runs[-1]


def assert_same_gradients(reference: list, other: list, rel: float = 1e-5):
    """Every step's gradients agree to `rel` of their norm, and none is zero."""
    assert reference and len(reference) == len(other)
    for step, (a, b) in enumerate(zip(reference, other), start=1):
        assert a.norm() > 0, f"step {step}: no gradient"
        assert (b - a).norm() <= rel * a.norm(), f"step {step}: {(b - a).norm() / a.norm():.2e} relative difference"
