"""Initial factors: Ortho-LoRA (paper Sec. 3.3) and the vanilla LoRA init.

The Gaussian R is rebuilt here from the documented seeding (per-layer seed = run seed * 1_000_003 +
crc32(layer key), mod 2**63 - 1; CPU torch.Generator; randn float64 of shape [out, in], divided by r),
and the factors are checked against R itself: R A^T = B diag(S) and R^T B = A^T diag(S) (matched
singular triplets, whatever signs the SVD picks) with S the chosen singular values of R.
"""
import zlib

import pytest
import torch

from tlora_pack.tlora_core import init
from tlora_pack.tlora_core.errors import TLoraConfigError


def documented_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2 ** 63 - 1)


def rebuild_gaussian(in_features, out_features, rank, seed, key):
    gen = torch.Generator(device="cpu").manual_seed(documented_seed(seed, key))
    return torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) / rank


SHAPES = [(24, 16, 4), (16, 40, 8), (12, 12, 12), (32, 32, 5)]  # (in, out, rank)


def test_layer_seed_follows_the_documented_formula():
    assert init.layer_seed(0, "a.b") == zlib.crc32(b"a.b")
    assert init.layer_seed(7, "x") == (7 * 1_000_003 + zlib.crc32(b"x")) % (2 ** 63 - 1)


@pytest.mark.parametrize("in_f,out_f,rank", SHAPES)
@pytest.mark.parametrize("mode", ["last", "principal", "middle"])
def test_ortho_factors_have_orthonormal_rows_and_columns(in_f, out_f, rank, mode):
    f = init.ortho_factors(in_f, out_f, rank, mode=mode, seed=3, layer_key="blk.to_q")
    assert f.down.shape == (rank, in_f) and f.up.shape == (out_f, rank) and f.scale.shape == (rank,)
    eye = torch.eye(rank)
    torch.testing.assert_close(f.down @ f.down.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(f.up.T @ f.up, eye, atol=1e-5, rtol=0)


def expected_slice(mode, rank, available):
    """Which singular values (largest first) each mode keeps, written out per the paper/reference."""
    if mode == "last":
        return slice(available - rank, available)
    if mode == "principal":
        return slice(0, rank)
    start = (available - rank) // 2  # 'middle': the centred block
    return slice(start, start + rank)


@pytest.mark.parametrize("in_f,out_f,rank", SHAPES)
@pytest.mark.parametrize("mode", ["last", "principal", "middle"])
def test_ortho_factors_are_matched_singular_triplets_of_the_seeded_gaussian(in_f, out_f, rank, mode):
    seed, key = 11, "down_blocks.1.attn1.to_k"
    f = init.ortho_factors(in_f, out_f, rank, mode=mode, seed=seed, layer_key=key)
    r_mat = rebuild_gaussian(in_f, out_f, rank, seed, key)
    svals = torch.linalg.svdvals(r_mat)  # descending
    expected_s = svals[expected_slice(mode, rank, min(in_f, out_f))]
    torch.testing.assert_close(f.scale.double(), expected_s, atol=1e-6, rtol=1e-5)
    down, up, s = f.down.double(), f.up.double(), f.scale.double()
    torch.testing.assert_close(r_mat @ down.T, up * s, atol=1e-5, rtol=0)
    torch.testing.assert_close(r_mat.T @ up, down.T * s, atol=1e-5, rtol=0)


def test_middle_slice_is_centred():
    # 16 singular values, rank 4: the middle block is indices 6..9.
    f = init.ortho_factors(16, 24, 4, mode="middle", seed=0, layer_key="m")
    svals = torch.linalg.svdvals(rebuild_gaussian(16, 24, 4, 0, "m"))
    torch.testing.assert_close(f.scale.double(), svals[6:10], atol=1e-6, rtol=1e-5)


def test_last_init_keeps_the_smallest_singular_values_in_descending_order():
    f = init.ortho_factors(20, 30, 6, mode="last", seed=5, layer_key="k")
    svals = torch.linalg.svdvals(rebuild_gaussian(20, 30, 6, 5, "k"))
    s = f.scale
    assert torch.all(s[:-1] >= s[1:]), "SVD order: largest of the kept values first"
    assert s.max().item() <= svals[-6].item() * (1 + 1e-6)
    assert s.max().item() < svals[0].item()
    # The first (mask-kept-longest) component is the largest of the smallest r.
    assert s[0].item() == pytest.approx(svals[-6].item(), rel=1e-5)
    assert s[-1].item() == pytest.approx(svals[-1].item(), rel=1e-5)


def test_principal_init_keeps_the_largest_singular_values():
    f = init.ortho_factors(20, 30, 6, mode="principal", seed=5, layer_key="k")
    svals = torch.linalg.svdvals(rebuild_gaussian(20, 30, 6, 5, "k"))
    torch.testing.assert_close(f.scale.double(), svals[:6], atol=1e-6, rtol=1e-5)


def test_ortho_factors_store_frozen_copies_that_do_not_alias_the_trainable_ones():
    f = init.ortho_factors(12, 10, 3, seed=1, layer_key="x")
    for name in ("down", "up", "scale"):
        trained, base = getattr(f, name), getattr(f, "base_" + name)
        assert torch.equal(trained, base)
        assert trained.data_ptr() != base.data_ptr()
    f.down.add_(1.0)
    assert not torch.equal(f.down, f.base_down)


def test_ortho_factors_are_deterministic_for_a_seed():
    a = init.ortho_factors(16, 12, 4, seed=42, layer_key="layer.a")
    b = init.ortho_factors(16, 12, 4, seed=42, layer_key="layer.a")
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name


def test_ortho_factors_differ_between_layers_and_seeds():
    a = init.ortho_factors(16, 12, 4, seed=42, layer_key="layer.a")
    b = init.ortho_factors(16, 12, 4, seed=42, layer_key="layer.b")
    c = init.ortho_factors(16, 12, 4, seed=43, layer_key="layer.a")
    assert not torch.allclose(a.down.abs(), b.down.abs(), atol=1e-3)
    assert not torch.allclose(a.down.abs(), c.down.abs(), atol=1e-3)


def test_ortho_factors_honour_the_dtype():
    f = init.ortho_factors(8, 8, 2, seed=0, layer_key="d", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in f.tensors().values())


def test_vanilla_factors_start_with_zero_up_and_gaussian_down():
    rank, in_f = 8, 4096
    f = init.vanilla_factors(in_f, 16, rank, seed=2, layer_key="v")
    assert torch.equal(f.up, torch.zeros(16, rank))
    assert f.scale is None and not f.has_base
    assert f.down.shape == (rank, in_f)
    # 32768 samples: the std estimate is within ~1 % of 1/r.
    assert f.down.std().item() == pytest.approx(1 / rank, rel=0.03)
    assert abs(f.down.mean().item()) < 5 * (1 / rank) / (rank * in_f) ** 0.5  # 5 standard errors


def test_vanilla_down_is_the_documented_seeded_gaussian():
    f = init.vanilla_factors(10, 6, 3, seed=9, layer_key="v.k")
    gen = torch.Generator().manual_seed(documented_seed(9, "v.k"))
    expected = (torch.randn(3, 10, generator=gen, dtype=torch.float64) / 3).float()
    assert torch.equal(f.down, expected)


@pytest.mark.parametrize("factory", [init.ortho_factors, init.vanilla_factors])
def test_rank_above_the_layer_size_raises_and_names_the_layer(factory):
    with pytest.raises(TLoraConfigError) as err:
        factory(6, 16, 8, layer_key="mid_block.attn2.to_v")
    msg = str(err.value)
    assert "mid_block.attn2.to_v" in msg and "8" in msg and "6" in msg


def test_rank_equal_to_the_smaller_dimension_is_allowed():
    f = init.ortho_factors(6, 16, 6, seed=0, layer_key="full")
    torch.testing.assert_close(f.down @ f.down.T, torch.eye(6), atol=1e-5, rtol=0)


def test_unknown_ortho_mode_is_refused():
    with pytest.raises(TLoraConfigError, match="sideways"):
        init.ortho_factors(8, 8, 2, mode="sideways")


def test_init_factors_dispatches_on_the_variant():
    ortho = init.init_factors(True, 8, 8, 2, seed=0, layer_key="a")
    plain = init.init_factors(False, 8, 8, 2, seed=0, layer_key="a")
    assert ortho.has_base and ortho.scale is not None
    assert not plain.has_base and torch.count_nonzero(plain.up) == 0
