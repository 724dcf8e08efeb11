"""Export a T-LoRA to a standard LoRA that ComfyUI's stock LoraLoader (and every kohya-style loader) reads.

A standard LoRA has no timestep, so the export freezes the rank mask m of one timestep t (t = 0, full rank,
by default) and writes dW(t) = B diag(S⊙m) A − B0 diag(S0⊙m) A0 (Eq. 6) as `<layer>.lora_up.weight`,
`<layer>.lora_down.weight` and `<layer>.alpha` = the layer's rank, so the loader's scale alpha/rank is 1.

- exact: dW itself, no truncation. Literally up = [B diag(S⊙m), −B0 diag(S0⊙m)], down = [A; A0] with the
  components of m = 0 left out (rank 2·r(t) for the orthogonal variants, r(t) for the others). By default it
  is stored re-factored (the same product through the QR/SVD below, all non-zero triplets kept): the two
  halves of the literal form nearly cancel after training, so rounding them to fp16 / bf16 costs
  ||B S A|| / ||dW|| times more (measured: 2.8e-3 vs about 3e-4 in fp16). Only the storage dtype rounds it.
- svd: the best rank-k approximation of the same dW (Eckart-Young). It is computed from the factors, never
  from the dense matrix: with up = Qu Ru and downᵀ = Qd Rd (thin QR), dW = Qu (Ru Rdᵀ) Qdᵀ, so the SVD of the
  small core gives dW's singular triplets; the kept singular values are split as sqrt(s) into both factors.

Every export reports the relative Frobenius error ||dW − up·down||_F / ||dW||_F of the stored factors per
layer and over all layers (sqrt(Σ err²) / sqrt(Σ ||dW||²)), measured in float64 on the factored forms.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .adapter import LayerFactors
from .errors import TLoraError
from .format import STORAGE_DTYPES, TLora, write_new_file
from .schedule import prefix_masks, rank_at

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "comfyui-tlora-export"
# ||dW|| below this fraction of ||up||·||down|| is float64 round-off of a cancelling pair, i.e. dW = 0
ZERO_TOLERANCE = 1e-12


@dataclass
class ExportReport:
    """What an export kept and what it cost."""

    mode: str                       # "exact" or "svd"
    timestep: Optional[float]       # t whose mask was frozen (None when a mask was given)
    kept: int                       # components the mask keeps (r(t))
    requested_rank: Optional[int]   # svd only
    storage: str
    layer_ranks: dict[str, int] = field(default_factory=dict)
    layer_errors: dict[str, float] = field(default_factory=dict)  # relative Frobenius error per layer
    overall_error: float = 0.0      # sqrt(Σ ||dW − LoRA||²) / sqrt(Σ ||dW||²)

    @property
    def max_error(self) -> float:
        return max(self.layer_errors.values(), default=0.0)

    def summary(self) -> str:
        where = f"t = {self.timestep:g}" if self.timestep is not None else "given mask"
        ranks = sorted(set(self.layer_ranks.values()))
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        return (f"{self.mode} export at {where} ({self.kept} components kept), {len(self.layer_ranks)} layers, "
                f"rank {rank_text}, {self.storage}: relative error {self.overall_error:.3e} overall, "
                f"{self.max_error:.3e} worst layer")


def mask_at(tlora: TLora, timestep: float) -> torch.Tensor:
    """The (r,) prefix mask M_t of Eq. 3 at timestep t, under the T-LoRA's own schedule settings."""
    c = tlora.config
    keep = rank_at(timestep, c.rank, c.schedule_min_rank, c.exponent, c.max_timestep)
    return prefix_masks([keep], c.rank)[0]


def exact_factors(f: LayerFactors, mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, k], down [k, in]) in float64 with up @ down = dW of Eq. 6 at `mask` (None = full rank)."""
    r = f.rank
    m = torch.ones(r, dtype=torch.float64) if mask is None else mask.detach().reshape(-1).to("cpu", torch.float64)
    if m.numel() != r:
        raise TLoraError(f"mask has {m.numel()} entries but the layer has rank {r}.")
    keep = torch.nonzero(m).reshape(-1)

    def part(down, up, scale):
        g = m[keep] if scale is None else m[keep] * scale.detach().to("cpu", torch.float64)[keep]
        return up.detach().to("cpu", torch.float64)[:, keep] * g, down.detach().to("cpu", torch.float64)[keep]

    up, down = part(f.down, f.up, f.scale)
    if f.has_base:
        up0, down0 = part(f.base_down, f.base_up, f.base_scale)
        up, down = torch.cat([up, -up0], dim=1), torch.cat([down, down0], dim=0)
    return up, down


def lowrank_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F without forming the product: ||Ru Rdᵀ||_F from thin QRs (no squared cancellation)."""
    if up.shape[1] == 0:
        return 0.0
    _, ru = torch.linalg.qr(up)
    _, rd = torch.linalg.qr(down.T)
    return float(torch.linalg.matrix_norm(ru @ rd.T))


def compress(up: torch.Tensor, down: torch.Tensor, rank: Optional[int] = None,
             drop_below: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of up @ down (float64), as (up', down') with sqrt(s) in each.

    rank None keeps every triplet, i.e. re-factors the same product with orthogonal frames; singular values
    at or below drop_below · s_max are left out either way (float64 round-off of cancelling terms).
    """
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    n = s.numel() if rank is None else min(rank, s.numel())
    if s.numel() and drop_below > 0:
        n = min(n, int((s > drop_below * s[0]).sum()))
    root = s[:n].sqrt()
    return (qu @ u[:, :n]) * root, root[:, None] * (vh[:n] @ qd.T)


def _relative_error(up, down, stored_up, stored_down) -> tuple[float, float]:
    """(||dW − stored||_F, ||dW||_F) in float64 from the factored forms."""
    norm = lowrank_norm(up, down)
    diff = lowrank_norm(torch.cat([up, -stored_up.to(torch.float64)], dim=1),
                        torch.cat([down, stored_down.to(torch.float64)], dim=0))
    return diff, norm


def _export_layer(f: LayerFactors, frozen: torch.Tensor, rank: Optional[int], refactor: bool, dtype):
    """(stored up, stored down, ||dW − stored||, ||dW||) of one layer."""
    exact_up, exact_down = exact_factors(f, frozen)
    up, down = exact_up, exact_down
    if up.shape[1] and (rank is not None or refactor):
        up, down = compress(up, down, rank, drop_below=ZERO_TOLERANCE)
    stored_up, stored_down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
    err, norm = _relative_error(exact_up, exact_down, stored_up, stored_down)
    if norm <= ZERO_TOLERANCE * float(exact_up.norm() * exact_down.norm()):
        norm = 0.0  # B S A and B0 S0 A0 cancel: float64 round-off of a zero update
    return stored_up, stored_down, err, norm


def _put_lora(out: dict, key: str, up: torch.Tensor, down: torch.Tensor):
    out[f"{key}.lora_up.weight"], out[f"{key}.lora_down.weight"] = up, down
    out[f"{key}.alpha"] = torch.tensor(float(up.shape[1]), dtype=up.dtype)  # scale alpha/rank = 1


def _whole_weight_factors(rows: int, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA on a whole fused weight from the adapters of its projections: their down factors
    stacked, their up factors placed block-diagonally at each projection's rows (zeros elsewhere), so
    up @ down is every projection's dW in its own rows and nothing in the others: exact, and a stock
    loader that knows only the fused weight reads it."""
    width = sum(up.shape[1] for _, up, _ in parts)
    up_all = torch.zeros(rows, width, dtype=parts[0][1].dtype)
    col = 0
    for offset, up, _ in parts:
        up_all[offset:offset + up.shape[0], col:col + up.shape[1]] = up
        col += up.shape[1]
    return up_all, torch.cat([down for _, _, down in parts], dim=0).contiguous()


def export_standard_lora(tlora: TLora, *, rank: Optional[int] = None, timestep: float = 0.0,
                         mask: Optional[torch.Tensor] = None, storage: str = "fp32",
                         refactor: bool = True) -> tuple[dict[str, torch.Tensor], ExportReport]:
    """kohya-style state dict of `tlora` frozen at `timestep` (or at an explicit (r,) `mask`).

    rank None: exact, every non-zero singular triplet of dW (at most 2·r(t), or r(t) without frozen factors);
    rank k: SVD-compressed to at most k. `refactor` (exact mode) stores dW's orthogonal re-factoring instead of
    the literal [B S m, −B0 S0 m] / [A; A0]: the same product, but the two halves of the literal form nearly
    cancel, so fp16/bf16 rounding of them costs ||B S A|| / ||dW|| times more. Layers whose dW is zero at
    this mask are left out (a loader has nothing to add for them). Adapters on projections of one fused
    weight (TLoraConfig.fused) become one LoRA on that whole weight, named by its module path.
    """
    if storage not in STORAGE_DTYPES:
        raise TLoraError(f"unknown storage dtype {storage!r}; choose one of {', '.join(STORAGE_DTYPES)}.")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise TLoraError(f"export rank must be a whole number >= 1, got {rank!r}.")
    frozen = mask_at(tlora, timestep) if mask is None else mask.detach().reshape(-1).cpu()
    report = ExportReport(mode="exact" if rank is None else "svd", timestep=None if mask is not None else timestep,
                          kept=int(torch.count_nonzero(frozen)), requested_rank=rank, storage=storage)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[int, list]] = {}  # fused weight -> (its rows, [(row offset, up, down)])
    total_err2 = total_norm2 = 0.0
    for key, f in tlora.layers.items():
        up, down, err, norm = _export_layer(f, frozen, rank, refactor, STORAGE_DTYPES[storage])
        total_err2, total_norm2 = total_err2 + err ** 2, total_norm2 + norm ** 2
        if norm == 0.0 or up.shape[1] == 0:
            continue
        report.layer_ranks[key] = up.shape[1]
        report.layer_errors[key] = err / norm
        if key in tlora.config.fused:
            module, offset, _, rows = tlora.config.fused[key]
            fused.setdefault(module, (rows, []))[1].append((offset, up, down))
        else:
            _put_lora(out, key, up, down)
    for module, (rows, parts) in fused.items():
        _put_lora(out, module, *_whole_weight_factors(rows, parts))
    report.overall_error = math.sqrt(total_err2 / total_norm2) if total_norm2 > 0 else 0.0
    if not out:
        raise TLoraError("every layer's update is zero at this timestep: nothing to export (an untrained T-LoRA?).")
    return out, report


def export_metadata(tlora: TLora, report: ExportReport) -> dict[str, str]:
    """Strings for the file header: where the LoRA came from and how it was frozen. Deliberately without
    `tlora.format`, so this pack never mistakes the export for a T-LoRA."""
    summary = asdict(report)
    summary.pop("layer_errors")
    summary.pop("layer_ranks")
    summary["max_error"] = report.max_error
    return {"format": "pt", "tlora.export_format": EXPORT_FORMAT, "tlora.exported_from": tlora.config.to_json(),
            "tlora.export": json.dumps(summary, sort_keys=True), "tlora.export_summary": report.summary()}


def save_standard_lora(tlora: TLora, path: str | os.PathLike, *, rank: Optional[int] = None,
                       timestep: float = 0.0, mask: Optional[torch.Tensor] = None, storage: str = "fp16",
                       refactor: bool = True) -> tuple[Path, ExportReport]:
    """Write the export to a new .safetensors (atomic, never overwrites); returns (path, report)."""
    tensors, report = export_standard_lora(tlora, rank=rank, timestep=timestep, mask=mask, storage=storage,
                                           refactor=refactor)
    metadata = export_metadata(tlora, report)
    written = write_new_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    logger.info("wrote standard LoRA %s: %s", written.name, report.summary())
    return written, report
