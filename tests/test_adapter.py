"""Adapter maths (paper Eq. 3, 5, 6) against dense matrices built by hand in float64.

    dW(t) = B · diag(S ⊙ m_t) · A  -  B0 · diag(S0 ⊙ m_t) · A0
"""
import pytest
import torch

from tlora_pack.tlora_core import init
from tlora_pack.tlora_core.adapter import (LayerFactors, activations_cheaper, delta_weight, frozen_product,
                                           masked_delta, stack_width, stacked_factors, trained_delta, training_path)
from tlora_pack.tlora_core.errors import TLoraFormatError

IN, OUT, R = 10, 7, 6


def random_factors(seed=0, base=True, scale=True, in_f=IN, out_f=OUT, rank=R) -> LayerFactors:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    return LayerFactors(down=rnd(rank, in_f), up=rnd(out_f, rank),
                        scale=rnd(rank).abs() + 0.5 if scale else None,
                        base_down=rnd(rank, in_f) if base else None, base_up=rnd(out_f, rank) if base else None,
                        base_scale=rnd(rank).abs() + 0.5 if base and scale else None)


def prefix(k, rank=R):
    return torch.tensor([1.0] * k + [0.0] * (rank - k))


def dense_delta(f: LayerFactors, m: torch.Tensor) -> torch.Tensor:
    """Eq. 6 written out: B diag(S*m) A - B0 diag(S0*m) A0, float64."""
    m = m.double()
    s = f.scale.double() if f.scale is not None else torch.ones(f.rank, dtype=torch.float64)
    w = f.up.double() @ torch.diag(s * m) @ f.down.double()
    if f.base_down is not None:
        s0 = f.base_scale.double() if f.base_scale is not None else torch.ones(f.rank, dtype=torch.float64)
        w = w - f.base_up.double() @ torch.diag(s0 * m) @ f.base_down.double()
    return w


@pytest.mark.parametrize("base,scale", [(True, True), (False, True), (False, False), (True, False)])
def test_masked_delta_applies_each_samples_own_mask(base, scale):
    f = random_factors(1, base=base, scale=scale)
    ks = [6, 1, 3, 0]
    masks = torch.stack([prefix(k) for k in ks])
    x = torch.randn(len(ks), 5, IN, generator=torch.Generator().manual_seed(2))
    out = masked_delta(x, f, masks)
    assert out.shape == (len(ks), 5, OUT)
    for b, k in enumerate(ks):
        expected = x[b].double() @ dense_delta(f, prefix(k)).T
        torch.testing.assert_close(out[b].double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(out[3]) == 0  # a row that keeps no component adds nothing


def test_masked_delta_with_one_shared_mask_and_without_mask():
    f = random_factors(3)
    x = torch.randn(2, 4, IN, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(masked_delta(x, f, prefix(2)).double(), x.double() @ dense_delta(f, prefix(2)).T,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masked_delta(x, f, None).double(), x.double() @ dense_delta(f, prefix(R)).T,
                               atol=1e-4, rtol=1e-4)


def test_masked_delta_on_two_dimensional_input():
    f = random_factors(5)
    masks = torch.stack([prefix(4), prefix(2)])
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(6))
    out = masked_delta(x, f, masks)
    for b, k in enumerate([4, 2]):
        torch.testing.assert_close(out[b].double(), x[b].double() @ dense_delta(f, prefix(k)).T, atol=1e-4, rtol=1e-4)


def test_active_truncation_gives_the_untruncated_result():
    f = random_factors(7)
    masks = torch.stack([prefix(3), prefix(1), prefix(2)])
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(8))
    full = masked_delta(x, f, masks)
    cut = masked_delta(x, f, masks, active=3)
    torch.testing.assert_close(cut, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(delta_weight(f, prefix(3), active=3), delta_weight(f, prefix(3)), atol=1e-6, rtol=1e-6)
    # Without a mask, `active` alone keeps the first `active` components.
    torch.testing.assert_close(masked_delta(x, f, None, active=2).double(), x.double() @ dense_delta(f, prefix(2)).T,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("base,scale", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("k", [0, 1, 4, R])
def test_delta_weight_equals_the_hand_built_dense_matrix(base, scale, k):
    f = random_factors(9, base=base, scale=scale)
    torch.testing.assert_close(delta_weight(f, prefix(k)).double(), dense_delta(f, prefix(k)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta_weight(f, prefix(k).unsqueeze(0)).double(), dense_delta(f, prefix(k)),
                               atol=1e-5, rtol=1e-5)


def test_delta_weight_without_mask_is_full_rank_and_honours_dtype():
    f = random_factors(10)
    dw = delta_weight(f, None, dtype=torch.float64)
    assert dw.dtype == torch.float64 and dw.shape == (OUT, IN)
    torch.testing.assert_close(dw, dense_delta(f, prefix(R)), atol=1e-10, rtol=1e-10)


def test_delta_weight_refuses_a_batch_of_different_masks():
    f = random_factors(10)
    with pytest.raises(ValueError, match="one mask row"):
        delta_weight(f, torch.stack([prefix(2), prefix(5)]))


def test_delta_weight_of_a_layer_applied_to_inputs_equals_masked_delta():
    f = random_factors(11)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(x @ delta_weight(f, prefix(4)).T, masked_delta(x, f, prefix(4)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["last", "principal", "middle"])
def test_update_is_exactly_zero_at_init_for_every_t(mode):
    rank = 8
    f = init.ortho_factors(12, 9, rank, mode=mode, seed=1, layer_key="z")
    x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(0))
    for k in range(0, rank + 1):  # every rank r(t) can take, hence every t
        m = prefix(k, rank)
        assert torch.count_nonzero(delta_weight(f, m)) == 0, k
        assert torch.count_nonzero(delta_weight(f, m, active=max(k, 1))) == 0, k
        assert torch.count_nonzero(masked_delta(x, f, torch.stack([m, prefix(rank - k, rank)]))) == 0, k
        assert torch.count_nonzero(masked_delta(x, f, m, active=max(k, 1))) == 0, k
    assert torch.count_nonzero(masked_delta(x, f, None)) == 0


def test_vanilla_update_is_exactly_zero_at_init():
    f = init.vanilla_factors(12, 9, 4, seed=1, layer_key="z")
    x = torch.randn(2, 3, 12)
    assert torch.count_nonzero(masked_delta(x, f, prefix(3, 4))) == 0
    assert torch.count_nonzero(delta_weight(f, None)) == 0


def test_update_changes_only_through_components_the_mask_keeps():
    rank, k = 8, 3
    f = init.ortho_factors(12, 9, rank, seed=2, layer_key="p")
    g = torch.Generator().manual_seed(1)
    # Perturb only the components the mask drops: dW at this t stays exactly zero ...
    f.down[k:] += torch.randn(rank - k, 12, generator=g)
    f.up[:, k:] += torch.randn(9, rank - k, generator=g)
    f.scale[k:] += 1.0
    assert torch.count_nonzero(delta_weight(f, prefix(k, rank))) == 0
    assert torch.count_nonzero(masked_delta(torch.randn(2, 12), f, prefix(k, rank))) == 0
    # ... while a mask that keeps them sees the change.
    assert torch.count_nonzero(delta_weight(f, prefix(k + 1, rank))) > 0
    # Perturbing a kept component changes dW at this t.
    f.scale[k - 1] += 0.5
    dw = delta_weight(f, prefix(k, rank)).double()
    expected = 0.5 * torch.outer(f.up[:, k - 1].double(), f.down[k - 1].double())
    torch.testing.assert_close(dw, expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_components_kept_at_high_t():
    rank, k = 8, 2  # a high-noise step keeps 2 of 8 components
    f = init.ortho_factors(12, 9, rank, seed=3, layer_key="g")
    for name in ("down", "up", "scale"):
        getattr(f, name).requires_grad_(True)
    x = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(5))
    target = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(6))
    loss = ((masked_delta(x, f, torch.stack([prefix(k, rank)] * 2)) - target) ** 2).sum()
    loss.backward()
    assert torch.count_nonzero(f.down.grad[k:]) == 0 and torch.all(f.down.grad[:k].abs().sum(1) > 0)
    assert torch.count_nonzero(f.up.grad[:, k:]) == 0 and torch.all(f.up.grad[:, :k].abs().sum(0) > 0)
    assert torch.count_nonzero(f.scale.grad[k:]) == 0 and torch.all(f.scale.grad[:k] != 0)
    assert f.base_down.grad is None and f.base_up.grad is None


def test_gradients_of_per_sample_masks_reach_the_union_of_kept_components():
    rank = 8
    f = init.ortho_factors(12, 9, rank, seed=4, layer_key="g2")
    f.down.requires_grad_(True)
    x = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(7))
    target = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(8))
    masks = torch.stack([prefix(2, rank), prefix(5, rank)])
    ((masked_delta(x, f, masks) - target) ** 2).sum().backward()
    assert torch.count_nonzero(f.down.grad[5:]) == 0 and torch.all(f.down.grad[:5].abs().sum(1) > 0)


def test_inconsistent_factor_shapes_are_refused():
    with pytest.raises(TLoraFormatError, match="scale"):
        LayerFactors(down=torch.zeros(3, 5), up=torch.zeros(4, 3), scale=torch.zeros(2))
    with pytest.raises(TLoraFormatError, match="not"):
        LayerFactors(down=torch.zeros(3, 5), up=torch.zeros(4, 2))
    with pytest.raises(TLoraFormatError, match="only one of"):
        LayerFactors(down=torch.zeros(3, 5), up=torch.zeros(4, 3), base_down=torch.zeros(3, 5))
    with pytest.raises(TLoraFormatError, match="differ in shape"):
        LayerFactors(down=torch.zeros(3, 5), up=torch.zeros(4, 3), base_down=torch.zeros(3, 6),
                     base_up=torch.zeros(4, 3))


def test_factors_report_their_shape_and_convert_dtype():
    f = random_factors(13)
    assert (f.rank, f.in_features, f.out_features) == (R, IN, OUT)
    h = f.to(dtype=torch.float16)
    assert set(h.tensors()) == set(f.tensors())
    assert all(t.dtype == torch.float16 for t in h.tensors().values())


@pytest.mark.parametrize("base,scale", [(True, True), (False, True), (False, False), (True, False)])
def test_stacked_factors_prefix_is_the_delta_of_the_first_k_components(base, scale):
    f = random_factors(21, base=base, scale=scale)
    left, right = stacked_factors(f, dtype=torch.float64)
    c = stack_width(f)
    assert left.shape == (OUT, c * R) and right.shape == (c * R, IN)
    for k in range(R + 1):
        torch.testing.assert_close(left[:, :c * k] @ right[:c * k], dense_delta(f, prefix(k)))
        sub_left, sub_right = stacked_factors(f, k, torch.float64)
        assert torch.equal(sub_left, left[:, :c * k]) and torch.equal(sub_right, right[:c * k])


def test_cost_rule_picks_activations_for_few_rows_and_weights_for_many():
    # Sampling: activations when rows * (in + out) < in * out, whatever k.
    assert activations_cheaper(154, 768, 1280, 48, True, with_grad=False)  # cross-attn value, 77 tokens x 2
    assert not activations_cheaper(8192, 320, 320, 48, True, with_grad=False)  # self-attn, 64x64 latent
    assert not activations_cheaper(512, 640, 640, 48, True, with_grad=False)  # 512 * 1280 > 640^2
    # Training adds the dense weight gradient (2 * 512 * 640^2 = 419 M) to the weight path:
    # weight 8 * 48 * 640^2 + 419 M = 577 M > activations 10 * 48 * 512 * 1280 = 315 M.
    assert activations_cheaper(512, 640, 640, 48, True, with_grad=True)
    # 320 channels, 4096 rows: weight 8 * 48 * 320^2 + 2 * 4096 * 320^2 = 878 M < activations 1.26 G.
    assert not activations_cheaper(4096, 320, 320, 48, True, with_grad=True)


@pytest.mark.parametrize("k", [1, 4, R])
def test_frozen_product_on_the_weight_plus_trained_pass_is_eq_6(k):
    """(W - B0 diag(S0 m) A0) x + B diag(S m) A x = W x + dW(t) x, against the dense Eq. 6 by hand."""
    f = random_factors(13)
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(14))
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(15))
    s0 = torch.diag(f.base_scale.double() * prefix(k).double())
    by_hand = f.base_up.double() @ s0 @ f.base_down.double()
    torch.testing.assert_close(frozen_product(f, prefix(k)).double(), by_hand, atol=1e-5, rtol=1e-5)
    split = x @ (w - frozen_product(f, prefix(k))).T + trained_delta(x, f, prefix(k))
    torch.testing.assert_close(split.double(), (x @ w.T).double() + x.double() @ dense_delta(f, prefix(k)).T,
                               atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="frozen factors"):
        frozen_product(random_factors(16, base=False), prefix(k))


def test_training_folds_the_frozen_product_onto_the_weight_where_rows_are_many():
    # k = 48, 320 channels: activations 10 k s, split 2 k io + 6 k s (s = rows (in + out) = 640 rows).
    # 1024 rows: activations 315 M > split 9.8 M + 189 M = 199 M (and weight 39 M + 210 M = 249 M).
    assert training_path(1024, 320, 320, 48, True) == "split"
    # 64 rows: activations 19.7 M < split 9.8 M + 11.8 M = 21.6 M.
    assert training_path(64, 320, 320, 48, True) == "activations"
    # no frozen factors: never split (there is nothing frozen to fold)
    assert training_path(1024, 320, 320, 48, False) != "split"
