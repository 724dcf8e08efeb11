"""Two measures of training memory that do not trust each other.

- `SavedTensors`: the bytes autograd keeps for backward, counted exactly in a
  `torch.autograd.graph.saved_tensors_hooks` context (each storage once, whatever views point at it),
  sorted by what they are: activations (by the module that saved them), copies of a layer's weight,
  and tensors that live anyway (the model's own weights, the adapter's parameters). Device-independent,
  no allocator noise.
- `AllocatorPeak`: the peak of bytes in use above a baseline: on CUDA the caching allocator's own count;
  on the CPU glibc's `mallinfo2()` (bytes in malloc'd blocks, mmap'd ones included), which pages freed
  and reused, memory mapped before the baseline and lazily touched pages cannot hide, sampled every
  millisecond beside the peak RSS (the older measure, kept for comparison).
"""
from __future__ import annotations

import ctypes
import threading
import time
from collections import defaultdict
from typing import Optional

import torch


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class SavedTensors:
    """Counts what autograd saves inside the context (enter it around forward passes; may be entered
    once per step: `steps` keeps each entry's count, `largest()` the biggest)."""

    RESIDENT = ("model weight", "adapter tensor")

    def __init__(self, model: Optional[torch.nn.Module] = None):
        self.own = set() if model is None else {_storage_key(p)[0] for p in model.parameters()}
        self.own |= set() if model is None else {_storage_key(b)[0] for b in model.buffers()}
        self.adapter: set[int] = set()
        self.steps: list[dict] = []
        self._stack: list[torch.nn.Module] = []

    def add_adapter(self, tensors):
        """Tensors of the adapter that live through the run although they need no gradient (T-LoRA's frozen
        copies B0, S0, A0): saved, they are resident like its parameters, not memory kept for backward."""
        self.adapter |= {_storage_key(t)[0] for t in tensors}

    def _classify(self, t: torch.Tensor) -> str:
        ptr, _ = _storage_key(t)
        if ptr in self.own:
            return "model weight"
        base = t if t._base is None else t._base  # a view of a parameter (a slice, a transpose) is the parameter
        if (base.is_leaf and base.requires_grad) or ptr in self.adapter:
            return "adapter tensor"
        module = self._stack[-1] if self._stack else None
        weight = getattr(module, "weight", None)
        if torch.is_tensor(weight) and t.dim() == 2 and sorted(t.shape) == sorted(weight.shape):  # or its transpose
            return "weight copy"
        return "activation: " + (type(module).__name__ if module is not None else "(outside modules)")

    def _pack(self, t: torch.Tensor):
        ptr, nbytes = _storage_key(t)
        if ptr not in self._seen:
            self._seen[ptr] = (nbytes, self._classify(t))
        return t

    def _push(self, module, args):
        self._stack.append(module)

    def _pop(self, module, args, output):
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def __enter__(self):
        self._seen: dict[int, tuple[int, str]] = {}
        self._handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._push),
                         torch.nn.modules.module.register_module_forward_hook(self._pop)]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        by_kind: dict[str, int] = defaultdict(int)
        for nbytes, kind in self._seen.values():
            by_kind[kind] += nbytes
        self.steps.append(dict(by_kind))
        self._stack.clear()
        return False

    def largest(self) -> dict:
        """The step that kept the most bytes that are not resident anyway: {kind: bytes}."""
        return max(self.steps, key=extra_bytes, default={})


def extra_bytes(by_kind: dict) -> int:
    """Saved bytes that exist only for backward (activations and weight copies)."""
    return sum(b for k, b in by_kind.items() if k not in SavedTensors.RESIDENT)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _malloc_in_use():
    """Bytes in use in glibc's heap (uordblks) and in its mmap'd blocks (hblkhd), or None without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    return in_use


class AllocatorPeak:
    """Peak bytes in use above the baseline at start(): CUDA allocator, or glibc malloc and RSS on the CPU."""

    def __init__(self, device: str, interval: float = 0.001):
        import psutil
        self.device, self.interval, self.proc = device, interval, psutil.Process()
        self.malloc = None if device == "cuda" else _malloc_in_use()
        self.base = self.peak = {}
        self._stop, self._thread = threading.Event(), None

    def sample(self) -> dict:
        if self.device == "cuda":
            return {"allocator": torch.cuda.memory_allocated()}
        now = {"rss": self.proc.memory_info().rss}
        if self.malloc is not None:
            now["allocator"] = self.malloc()
        return now

    def start(self):
        import gc
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.base = self.sample()
        self.peak = dict(self.base)
        if self.device != "cuda":
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            for k, v in self.sample().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.interval)

    def stop(self) -> dict:
        """{measure: peak bytes above the baseline} ('allocator', and 'rss' on the CPU)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = {"allocator": torch.cuda.max_memory_allocated()}
        else:
            self._stop.set()
            self._thread.join()
        return {k: self.peak[k] - self.base[k] for k in self.peak}
