"""Rank schedule r(t) (paper Sec. 3.2, unnumbered), its prefix masks, and sigma -> t conversions.

Expected values are written by hand or computed here from the paper's formula with exact rational
arithmetic (fractions.Fraction), never by calling the schedule code a second time.

Paper (Sec. 3.2), T = 1000:   r(t) = floor((r - r_min) * (T - t) / T) + r_min
Reference SD-XL code:      int(((T - t) / T) ** alpha * (rank - min_rank)) + min_rank
In the reference's trainer t is a 0-d int64 tensor, so ((T - t) / T) is evaluated in float32; in its
pipeline t is a float32 scheduler timestep. In plain Python the same expression runs in float64.

Where the two differ (exponent 1, integer t in [0, 1000)): the rounded quotient (T - t) / T times
(r - r_min) can land just below an integer that the exact product reaches, e.g. 0.58 * 50 =
28.999999999999996, so the reference keeps one component fewer. Measured over every span r - r_min
in 0..256: no difference at all for spans below 50 (so none for 64/32, 64/1, 128/64, 32/1, 16/8);
float64 differs for spans 50, 90, 100, 150, 170, 180, 200; float32 for 75, 100, 120, 150, 180, 200,
225, 240; always by exactly one component, always at t where the exact product is a whole number.
Our code follows the paper's exact floor; the tests below pin the documented cases.
"""
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tlora_pack.tlora_core import schedule

T = 1000


def paper_rank(t: int, rank: int, min_rank: int) -> int:
    """r(t) of Sec. 3.2 with exact rational arithmetic (exponent 1)."""
    return math.floor(Fraction(rank - min_rank) * Fraction(T - t, T)) + min_rank


def reference_rank_float64(t, rank, min_rank, alpha=1.0):
    """The reference code's expression evaluated with Python floats."""
    return int(((T - t) / T) ** alpha * (rank - min_rank)) + min_rank


def reference_rank_float32(t: int, rank: int, min_rank: int) -> int:
    """The reference trainer's expression with t a 0-d int64 tensor (float32 maths)."""
    return int(((T - torch.tensor(t)) / T) ** 1 * (rank - min_rank)) + min_rank


# (rank, min_rank, exponent) -> r(t) at t = 0, 1, 499, 500, 998, 999, worked out by hand.
HAND_TABLE = {
    (64, 32, 1.0): [64, 63, 48, 48, 32, 32],   # 32*999/1000 = 31.968; 32*501/1000 = 16.032
    (64, 1, 1.0): [64, 63, 32, 32, 1, 1],      # 63*0.999 = 62.937; 63*0.501 = 31.563; 63*0.5 = 31.5
    (4, 1, 1.0): [4, 3, 2, 2, 1, 1],           # 3*0.999 = 2.997; 3*0.501 = 1.503; 3*0.002 = 0.006
    (100, 1, 1.0): [100, 99, 50, 50, 1, 1],    # 99*0.999 = 98.901; 99*0.501 = 49.599
    (8, 8, 1.0): [8, 8, 8, 8, 8, 8],           # r_min = r: full rank everywhere
    (16, 8, 2.0): [16, 15, 10, 10, 8, 8],      # 8*0.999^2 = 7.984; 8*0.501^2 = 2.008; 8*0.25 = 2
    (64, 32, 0.5): [64, 63, 54, 54, 33, 33],   # 32*sqrt(.501) = 22.65; 32*sqrt(.002) = 1.43; 32*sqrt(.001) = 1.01
}
TABLE_T = [0, 1, 499, 500, 998, 999]


@pytest.mark.parametrize("rank,min_rank,exponent", sorted(HAND_TABLE))
def test_rank_at_matches_hand_computed_table(rank, min_rank, exponent):
    got = [schedule.rank_at(t, rank, min_rank, exponent) for t in TABLE_T]
    assert got == HAND_TABLE[(rank, min_rank, exponent)]


@pytest.mark.parametrize("rank,min_rank", [(64, 32), (64, 1), (128, 64), (32, 1), (16, 8), (4, 1), (100, 1), (51, 1)])
def test_rank_at_follows_the_papers_exact_floor_for_every_integer_t(rank, min_rank):
    got = [schedule.rank_at(t, rank, min_rank) for t in range(T)]
    assert got == [paper_rank(t, rank, min_rank) for t in range(T)]


@pytest.mark.parametrize("rank,min_rank", [(64, 32), (64, 1), (128, 64), (32, 1), (16, 8), (4, 1), (8, 2)])
def test_rank_at_equals_the_reference_expression_for_common_settings(rank, min_rank):
    for t in range(T):
        expected = reference_rank_float64(t, rank, min_rank)
        assert schedule.rank_at(t, rank, min_rank) == expected, t
        assert reference_rank_float32(t, rank, min_rank) == expected, t


# (rank, min_rank) -> {t: (ours = paper, reference in float64)} for every t in [0, 1000) that differs.
REFERENCE_FLOAT64_DIFFERS = {
    (51, 1): {420: (30, 29)},                        # 0.58 * 50 = 28.999999999999996
    (101, 1): {420: (59, 58), 430: (58, 57), 710: (30, 29)},
}


@pytest.mark.parametrize("rank,min_rank", sorted(REFERENCE_FLOAT64_DIFFERS))
def test_rank_at_differs_from_the_float64_reference_only_where_documented(rank, min_rank):
    differs = {}
    for t in range(T):
        ours, ref = schedule.rank_at(t, rank, min_rank), reference_rank_float64(t, rank, min_rank)
        if ours != ref:
            differs[t] = (ours, ref)
    assert differs == REFERENCE_FLOAT64_DIFFERS[(rank, min_rank)]


def test_reference_float32_trainer_differs_where_documented():
    # rank 76, r_min 1 (span 75): the reference trainer (float32) keeps 63 at t = 160, the paper 64.
    assert schedule.rank_at(160, 76, 1) == paper_rank(160, 76, 1) == 64
    assert reference_rank_float32(160, 76, 1) == 63
    assert reference_rank_float64(160, 76, 1) == 64


@pytest.mark.parametrize("rank,min_rank,exponent", [(64, 32, 2.0), (64, 32, 0.5), (16, 4, 1.7), (64, 1, 3.0)])
def test_rank_at_with_exponent_equals_the_reference_expression(rank, min_rank, exponent):
    for t in range(T):
        assert schedule.rank_at(t, rank, min_rank, exponent) == reference_rank_float64(t, rank, min_rank, exponent), t


@settings(max_examples=200, deadline=None)
@given(rank=st.integers(1, 512), data=st.data())
def test_rank_at_equals_exact_floor_for_random_settings(rank, data):
    min_rank = data.draw(st.integers(1, rank))
    t = data.draw(st.integers(0, T))
    assert schedule.rank_at(t, rank, min_rank) == paper_rank(t, rank, min_rank)


def test_rank_at_keeps_full_rank_at_t0_and_r_min_at_T_and_clamps_outside():
    assert schedule.rank_at(0, 64, 32) == 64
    assert schedule.rank_at(T, 64, 32) == 32
    assert schedule.rank_at(1500, 64, 32) == 32
    assert schedule.rank_at(-3, 64, 32) == 64
    assert schedule.rank_at(1500, 64, 32, 2.0) == 32


def test_rank_at_takes_fractional_scheduler_timesteps():
    # EulerDiscrete gives float timesteps: 32 * (1000 - 957.36) / 1000 = 1.3645 -> 1
    assert schedule.rank_at(957.36, 64, 32) == 33
    assert schedule.rank_at(0.5, 64, 32) == 63  # 32 * 0.9995 = 31.984


def test_rank_at_never_increases_with_t():
    for rank, min_rank, exponent in [(64, 32, 1.0), (64, 1, 0.5), (64, 1, 2.0)]:
        ranks = [schedule.rank_at(t, rank, min_rank, exponent) for t in range(T + 1)]
        assert all(a >= b for a, b in zip(ranks, ranks[1:]))
        assert min(ranks) == min_rank and max(ranks) == rank


def test_prefix_masks_keep_the_first_components():
    masks = schedule.prefix_masks([3, 0, 5, 1], 5)
    expected = torch.tensor([[1., 1., 1., 0., 0.],
                             [0., 0., 0., 0., 0.],
                             [1., 1., 1., 1., 1.],
                             [1., 0., 0., 0., 0.]])
    assert masks.dtype == torch.float32
    assert torch.equal(masks, expected)


def test_rank_masks_gives_one_row_per_sample_for_a_batch_of_timesteps():
    # rank 8, r_min 2 (span 6): t=0 -> 8; t=500 -> 3+2 = 5; t=999 -> 2; t=250 -> floor(4.5)+2 = 6
    t = torch.tensor([0, 500, 999, 250])
    masks = schedule.rank_masks(t, 8, 2)
    expected = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    assert masks.shape == (4, 8)
    assert torch.equal(masks, expected)
    assert schedule.ranks_for_timesteps(t, 8, 2) == [8, 5, 2, 6]


def test_rank_masks_honours_dtype_and_float_timesteps():
    masks = schedule.rank_masks(torch.tensor([999.0, 0.0]), 4, 1, dtype=torch.float16)
    assert masks.dtype == torch.float16
    assert masks.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]


# ---- sigma -> t -------------------------------------------------------------------------------------

def sd15_sigmas() -> torch.Tensor:
    """SD1.5's DDPM training sigmas: betas linear in sqrt space from 0.00085 to 0.012, 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def test_sd15_sigma_table_has_the_known_end_points():
    sigmas = sd15_sigmas()
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=1e-3)


def test_discrete_sigma_maps_to_its_own_index():
    sigmas = sd15_sigmas()
    t = schedule.t_from_sigma_discrete(sigmas.to(torch.float32), sigmas)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32))


def test_discrete_sigma_between_table_entries_goes_to_the_nearest_in_log_space():
    sigmas = sd15_sigmas()
    log_s = sigmas.log()
    i = 600
    # 40 % of the way (in log space) from sigma[i] to sigma[i+1] -> i; 60 % of the way -> i+1.
    near_i = torch.exp(0.6 * log_s[i] + 0.4 * log_s[i + 1]).to(torch.float32)
    near_next = torch.exp(0.4 * log_s[i] + 0.6 * log_s[i + 1]).to(torch.float32)
    # The arithmetic midpoint lies ABOVE the log midpoint, so it belongs to i+1.
    arith_mid = ((sigmas[i] + sigmas[i + 1]) / 2).to(torch.float32)
    t = schedule.t_from_sigma_discrete(torch.stack([near_i, near_next, arith_mid]), sigmas)
    assert t.tolist() == [600.0, 601.0, 601.0]


def test_discrete_sigma_keeps_the_batch_shape_and_clamps_to_the_table():
    sigmas = sd15_sigmas()
    sigma = torch.tensor([[100.0, 1e-4], [float(sigmas[250]), float(sigmas[999])]])
    t = schedule.t_from_sigma_discrete(sigma, sigmas)
    assert t.shape == (2, 2)
    assert t.tolist() == [[999.0, 0.0], [250.0, 999.0]]


def test_discrete_sigma_to_rank_end_to_end():
    sigmas = sd15_sigmas()
    t = schedule.t_from_sigma_discrete(sigmas[[0, 499, 999]].to(torch.float32), sigmas)
    assert schedule.ranks_for_timesteps(t, 64, 32) == [64, 48, 32]


def test_flow_sigma_is_scaled_to_T():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert schedule.t_from_sigma_flow(sigma).tolist() == [0.0, 250.0, 500.0, 1000.0]
    assert schedule.t_from_sigma_flow(torch.tensor([0.5]), T=500).tolist() == [250.0]
    # sigma 1 (pure noise) gives r_min; sigma 0 the full rank; sigma 0.5 -> 32*0.5 + 32 = 48.
    assert schedule.ranks_for_timesteps(schedule.t_from_sigma_flow(sigma), 64, 32) == [64, 56, 48, 32]
