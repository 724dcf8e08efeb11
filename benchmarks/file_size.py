"""File size and fp16 accuracy of an SD-XL-shaped T-LoRA, next to the reference implementation's file.

The reference (ControlGenAI/T-LoRA) adapts to_q, to_k, to_v and to_out[0] of attn1 and attn2 in every
SD-XL UNet transformer block and saves, per layer, the trainable q/p/lambda and their frozen copies:
rank 64 gives 3360 tensors, about 186 M values, about 709 MiB in fp32.

SD-XL UNet transformer blocks (70): 640 channels: down_blocks.1 (2 attentions x depth 2) and
up_blocks.1 (3 x 2); 1280 channels: down_blocks.2 (2 x 10), mid_block (1 x 10), up_blocks.0 (3 x 10).
attn2's to_k / to_v read the 2048-wide text embedding.

Run:  .venv/bin/python benchmarks/file_size.py [--rank 64] [--keep DIR]
The size part fills the factors with random tensors of the right shapes (the float64 SVD of the
Ortho-LoRA init would take minutes for 560 layers); the init time per layer is timed separately.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if "tlora_pack" not in sys.modules:  # the pack's folder imported as a package, as the tests do
    _pkg = types.ModuleType("tlora_pack")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["tlora_pack"] = _pkg

from tlora_pack.tlora_core import init, schedule  # noqa: E402
from tlora_pack.tlora_core.adapter import LayerFactors, delta_weight  # noqa: E402
from tlora_pack.tlora_core.config import TLoraConfig  # noqa: E402
from tlora_pack.tlora_core.format import TLora, load_tlora, save_tlora  # noqa: E402

REFERENCE_MIB = 709
TEXT_DIM = 2048
# (block prefix, channels, attentions, transformer depth)
SDXL_ATTENTIONS = [("down_blocks.1", 640, 2, 2), ("down_blocks.2", 1280, 2, 10), ("mid_block", 1280, 1, 10),
                   ("up_blocks.0", 1280, 3, 10), ("up_blocks.1", 640, 3, 2)]


def sdxl_attention_layers() -> dict[str, tuple[int, int]]:
    """Diffusers module path -> (in_features, out_features) of every adapted projection."""
    layers = {}
    for prefix, ch, n_attn, depth in SDXL_ATTENTIONS:
        for a in range(n_attn):
            for b in range(depth):
                block = f"{prefix}.attentions.{a}.transformer_blocks.{b}"
                for attn in ("attn1", "attn2"):
                    kv_in = TEXT_DIM if attn == "attn2" else ch
                    layers[f"{block}.{attn}.to_q"] = (ch, ch)
                    layers[f"{block}.{attn}.to_k"] = (kv_in, ch)
                    layers[f"{block}.{attn}.to_v"] = (kv_in, ch)
                    layers[f"{block}.{attn}.to_out.0"] = (ch, ch)
    return layers


def random_factors(in_f: int, out_f: int, rank: int, gen: torch.Generator) -> LayerFactors:
    """Independent random trained and base factors of the right shapes (dW != 0)."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen) / rank
    return LayerFactors(down=rnd(rank, in_f), up=rnd(out_f, rank), scale=rnd(rank).abs(),
                        base_down=rnd(rank, in_f), base_up=rnd(out_f, rank), base_scale=rnd(rank).abs())


def drifted_ortho(in_f: int, out_f: int, rank: int, drift: float, key: str) -> LayerFactors:
    """Ortho-LoRA init, then every trainable factor moved by `drift` relative (as training does)."""
    f = init.ortho_factors(in_f, out_f, rank, seed=0, layer_key=key)
    g = torch.Generator().manual_seed(1)
    f.down = f.down + drift * f.down.abs().mean() * torch.randn(f.down.shape, generator=g)
    f.up = f.up + drift * f.up.abs().mean() * torch.randn(f.up.shape, generator=g)
    f.scale = f.scale * (1 + drift * torch.randn(f.scale.shape, generator=g))
    return f


def relative_dw_error(original: TLora, stored: TLora, keys, cfg: TLoraConfig) -> dict[int, float]:
    """Worst relative Frobenius error of dW(t) over `keys`, per t."""
    out = {}
    for t in (0, 500, 999):
        mask = schedule.rank_masks(torch.tensor([t]), cfg.rank, cfg.min_rank)[0]
        worst = 0.0
        for key in keys:
            ref = delta_weight(original.layers[key], mask, dtype=torch.float64)
            got = delta_weight(stored.layers[key], mask, dtype=torch.float64)
            worst = max(worst, ((got - ref).norm() / ref.norm()).item())
        out[t] = worst
    return out


def mib(path: Path) -> float:
    return path.stat().st_size / 2 ** 20


def size_part(cfg: TLoraConfig, folder: Path):
    shapes = sdxl_attention_layers()
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    tl = TLora(config=cfg, layers={k: random_factors(i, o, cfg.rank, gen) for k, (i, o) in shapes.items()})
    print(f"layers: {len(tl.layers)} (transformer blocks: {len(tl.layers) // 8}); built in "
          f"{time.perf_counter() - start:.1f} s")
    n_tensors = sum(len(f.tensors()) for f in tl.layers.values())
    print(f"tensors: {n_tensors} (reference: 3360); values: {tl.num_values():,} "
          f"({tl.num_values() / 1e6:.1f} M; reference about 186 M)")
    for storage in ("fp32", "fp16"):
        start = time.perf_counter()
        path = save_tlora(tl, folder / f"sdxl_r{cfg.rank}_{storage}.safetensors", storage=storage)
        saved = time.perf_counter() - start
        start = time.perf_counter()
        back = load_tlora(path)
        print(f"{storage}: {mib(path):.1f} MiB (reference fp32: {REFERENCE_MIB} MiB); "
              f"save {saved:.1f} s, load {time.perf_counter() - start:.1f} s")
        if storage == "fp16":
            sample = [k for k in tl.layers if k.endswith(("attn1.to_q", "attn2.to_k"))][:6]
            errs = relative_dw_error(tl, back, sample, cfg)
            print("fp16 relative Frobenius error of dW, independent random factors (6 layers, worst): "
                  + ", ".join(f"t={t}: {e:.2e}" for t, e in errs.items()))
        del back


def drift_part(cfg: TLoraConfig, folder: Path):
    """fp16 error when dW is a small difference of two large products, as early in training."""
    for drift in (0.01, 0.1, 1.0):
        key = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
        tl = TLora(config=cfg, layers={key: drifted_ortho(1280, 1280, cfg.rank, drift, key)})
        back = load_tlora(save_tlora(tl, folder / f"drift_{drift}.safetensors", storage="fp16"))
        errs = relative_dw_error(tl, back, [key], cfg)
        print(f"fp16 relative Frobenius error of dW, Ortho init + drift {drift} (1280x1280): "
              + ", ".join(f"t={t}: {e:.2e}" for t, e in errs.items()))


def init_timing(rank: int):
    n_layers = {}
    for in_f, out_f in sdxl_attention_layers().values():
        n_layers[(in_f, out_f)] = n_layers.get((in_f, out_f), 0) + 1
    init.ortho_factors(64, 64, min(rank, 64), seed=0, layer_key="warmup")  # load LAPACK first
    total = 0.0
    for (in_f, out_f), count in sorted(n_layers.items()):
        runs = []
        for repeat in range(3):  # best of 3
            start = time.perf_counter()
            init.ortho_factors(in_f, out_f, rank, seed=repeat, layer_key=f"{in_f}x{out_f}")
            runs.append(time.perf_counter() - start)
        per = min(runs)
        total += per * count
        print(f"ortho init {out_f}x{in_f} (out x in), rank {rank}: {per:.2f} s per layer, {count} layers")
    print(f"ortho init of all {sum(n_layers.values())} layers: about {total:.0f} s "
          f"on {torch.get_num_threads()} threads")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--keep", type=Path, default=None, help="write the files here and keep them")
    args = parser.parse_args()
    cfg = TLoraConfig(rank=args.rank, min_rank=args.rank // 2, base_model="SDXL", source="benchmark")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="tlora_bench_"))
    try:
        size_part(cfg, folder)
        drift_part(cfg, folder)
        init_timing(args.rank)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
