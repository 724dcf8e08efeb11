"""The paper's formulas written out by hand, for references that use no pack code."""
import torch


def paper_rank(t, rank: int, min_rank: int, T: int = 1000) -> int:
    """r(t) = floor((r - r_min)(T - t)/T) + r_min (paper Sec. 3.2)."""
    return int((rank - min_rank) * (T - t) // T) + min_rank


def dense_delta(f, keep: int) -> torch.Tensor:
    """dW of Eq. 6 for a prefix mask keeping the first `keep` components: B diag(S m) A, minus
    B0 diag(S0 m) A0 where the factors have frozen copies (S = 1 where absent)."""
    def part(down, up, scale):
        g = torch.ones(down.shape[0]) if scale is None else scale.clone()
        g[keep:] = 0
        return (up * g) @ down
    dw = part(f.down, f.up, f.scale)
    if f.base_down is not None:
        dw = dw - part(f.base_down, f.base_up, f.base_scale)
    return dw


def moved_factors(tlora, seed: int = 1):
    """The same T-LoRA with every factor moved by seeded noise, so each layer's (and slice's) dW is clearly
    non-zero where a few training steps moved it only a little."""
    from tlora_pack.tlora_core.adapter import LayerFactors
    from tlora_pack.tlora_core.format import TLora

    gen = torch.Generator().manual_seed(seed)
    layers = {k: LayerFactors(**{n: t + 0.05 * torch.randn(t.shape, generator=gen) for n, t in f.tensors().items()})
              for k, f in tlora.layers.items()}
    return TLora(tlora.config, layers)
