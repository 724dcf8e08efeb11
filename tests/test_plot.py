"""The Train node's loss chart: axes with ticks where the data says, raw and EMA curves, t-coloured dots.

The image is read back as pixels; the axes are found in it (the two long black lines) and tick
positions are computed here by hand from the data range, not from the plotting code."""
import pytest
import torch

from tlora_pack.trainer.plot import EMA, RAW, T_HIGH, T_LOW, ema, loss_curve_image

STEPS = 101
LOSSES = [0.1 + 0.8 * i / (STEPS - 1) for i in range(STEPS)]  # 0.1 at step 1 ... 0.9 at step 101
# by hand: loss axis 0 .. 1 in steps of 0.2; step axis 1 .. 101 with ticks at 20, 40, 60, 80, 100
Y_TICKS, X_TICKS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], [20, 40, 60, 80, 100]


def _pixels(image: torch.Tensor) -> torch.Tensor:
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3  # a ComfyUI IMAGE batch of one
    return (image[0] * 255).round().to(torch.int32)


def _axes(px: torch.Tensor):
    """(left, top, right, bottom) of the box whose left and bottom edges are the longest black lines."""
    black = (px < 40).all(dim=-1)
    left = int(black.sum(dim=0).argmax())
    bottom = int(black.sum(dim=1).argmax())
    rows, cols = black[:, left].nonzero().flatten(), black[bottom].nonzero().flatten()
    return left, int(rows.min()), int(cols.max()), bottom


def _dark_near(px, row, col):
    return bool((px[row - 1:row + 2, col - 1:col + 2] < 80).all(dim=-1).any())


@pytest.fixture(scope="module")
def chart():
    t = [1000.0 if i == 50 else 0.0 for i in range(STEPS)]  # step 51 at the noisiest t, the rest at t = 0
    return _pixels(loss_curve_image(LOSSES, t, first_step=1, max_t=1000.0, width=640, height=400))


def test_axes_are_long_lines_along_most_of_the_image(chart):
    left, top, right, bottom = _axes(chart)
    h, w = chart.shape[:2]
    assert right - left > 0.7 * w and bottom - top > 0.6 * h
    assert left > 30 and bottom < h - 30, "room for tick labels left of and below the axes"


def test_step_ticks_sit_where_the_step_numbers_fall(chart):
    left, _, right, bottom = _axes(chart)

    def col(step):
        return round(left + (right - left) * (step - 1) / (STEPS - 1))

    for step in X_TICKS:
        assert _dark_near(chart, bottom + 4, col(step)), step
    for step in (30, 50, 70, 90):  # between ticks: no mark
        assert not _dark_near(chart, bottom + 4, col(step)), step


def test_loss_ticks_sit_at_round_values(chart):
    left, top, _, bottom = _axes(chart)

    def row(loss):
        return round(bottom - (bottom - top) * loss / 1.0)

    for loss in Y_TICKS[1:]:
        assert _dark_near(chart, row(loss), left - 4), loss
    for loss in (0.1, 0.3, 0.5, 0.7, 0.9):
        assert not _dark_near(chart, row(loss), left - 4), loss
    assert (chart[:row(0.5), :left - 8] < 80).all(dim=-1).any(), "tick labels left of the loss axis"


def test_raw_curve_faint_and_ema_bold():
    px = _pixels(loss_curve_image(LOSSES))  # no t: no dots over the raw line
    left, top, right, bottom = _axes(px)
    inside = px[top:bottom, left + 3:right]

    def count(colour):
        return int((inside - torch.tensor(colour)).abs().le(2).all(dim=-1).sum())

    # both run ~500 px: the raw line about 2 px thick, the EMA about 4
    assert 500 < count(RAW) < 1600 and count(EMA) > 1800, (count(RAW), count(EMA))


def test_dots_coloured_by_t(chart):
    left, top, right, bottom = _axes(chart)
    x = round(left + (right - left) * 50 / (STEPS - 1))
    y = round(bottom - (bottom - top) * LOSSES[50])
    assert (chart[y, x] - torch.tensor(T_HIGH)).abs().max() <= 2, chart[y, x]
    x = round(left + (right - left) * 25 / (STEPS - 1))
    y = round(bottom - (bottom - top) * LOSSES[25])
    assert (chart[y, x] - torch.tensor(T_LOW)).abs().max() <= 2, chart[y, x]


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    # weights 1 (newest) and 0.5 (previous): (1 * 2 + 0.5 * 0) / 1.5
    assert ema([0.0, 2.0], 0.5) == pytest.approx([0.0, 4 / 3])


def test_no_steps_and_a_constant_loss_still_draw_axes():
    for losses in ([], [0.3], [0.3, 0.3]):
        left, top, right, bottom = _axes(_pixels(loss_curve_image(losses)))
        assert right - left > 300 and bottom - top > 200, losses


def test_timesteps_must_match_losses():
    with pytest.raises(ValueError, match="2 timesteps for 3 losses"):
        loss_curve_image([0.1, 0.2, 0.3], [0.0, 1.0])
