"""benchmarks/memory_counts.py: the bytes autograd saves for backward, counted against what the ops
are known to save (worked out by hand below), sorted by kind."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from memory_counts import AllocatorPeak, SavedTensors, extra_bytes  # noqa: E402


class CopyingLinear(torch.nn.Linear):
    """Multiplies by a fresh copy of its weight, as ComfyUI's ops do once a weight function is set."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.clone())


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.copying = torch.nn.Linear(4, 3, bias=False), CopyingLinear(4, 3, bias=False)
        self.requires_grad_(False)  # a frozen base

    def forward(self, x, copy_weight):
        return torch.sigmoid((self.copying if copy_weight else self.lin)(x))


def test_saved_bytes_by_kind_match_what_each_op_saves():
    net = Net()
    x = torch.randn(2, 4, requires_grad=True)
    counter = SavedTensors(net)
    with counter:
        net(x * 2, copy_weight=False)
    # a frozen linear saves only its weight (3x4 fp32 = 48 B, the model's own) for the input gradient;
    # sigmoid saves its output (2x3 = 24 B), computed in Net's forward (the innermost module then)
    assert counter.steps[-1] == {"model weight": 48, "activation: Net": 24}
    assert extra_bytes(counter.steps[-1]) == 24
    with counter:
        net(x * 2, copy_weight=True)
    # the copy the layer multiplies by is saved in its place: memory that exists only for backward
    assert counter.steps[-1] == {"weight copy": 48, "activation: Net": 24}
    assert extra_bytes(counter.largest()) == 48 + 24


def test_each_storage_counts_once_whatever_views_point_at_it():
    x = torch.randn(8, 8, requires_grad=True)
    counter = SavedTensors()
    with counter:
        h = x * 1.0  # a fresh 256 B activation
        (h[:4].exp() + h[4:].exp()).sum()  # exp saves its outputs: two new 128 B storages
        (h.sin()).sum()  # sin saves its input h
    assert counter.steps[-1] == {"activation: (outside modules)": 256 + 128 + 128}
    with counter:
        (x * x).sum()  # mul saves both operands: the same leaf storage, counted once
    assert counter.steps[-1] == {"adapter tensor": 256}


def test_registered_adapter_tensors_count_as_resident_though_they_need_no_gradient():
    """A frozen factor (T-LoRA's B0) that a frozen-factor product saves is resident, not kept for backward;
    the same op on an unregistered tensor is counted as an activation."""
    x = torch.randn(3, 4, requires_grad=True)
    frozen, other = torch.randn(2, 4), torch.randn(2, 4)
    counter = SavedTensors()
    counter.add_adapter([frozen])
    with counter:
        torch.nn.functional.linear(x, frozen)  # saves its weight (2x4 fp32) for the input gradient
        torch.nn.functional.linear(x, other)
    assert counter.steps[-1] == {"adapter tensor": 32, "activation: (outside modules)": 32}
    assert extra_bytes(counter.steps[-1]) == 32
    trained = torch.randn(4, 6, requires_grad=True)
    with counter:
        h = x * 1.0  # a fresh 48 B activation
        (h @ trained[:, :2]).sum()  # matmul saves both operands: h and a view of the parameter (its 96 B storage)
    assert counter.steps[-1] == {"adapter tensor": 96, "activation: (outside modules)": 48}


def test_allocator_peak_sees_a_buffer_held_while_it_samples():
    peak = AllocatorPeak("cpu").start()
    held = torch.ones(16 * 2 ** 20 // 4)  # 16 MiB, touched
    import time
    time.sleep(0.05)
    got = peak.stop()
    del held
    assert got["allocator"] >= 15 * 2 ** 20
