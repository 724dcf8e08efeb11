"""Writers of other implementations' T-LoRA files, from their documented layouts (shared README, section 1-2),
and their forward formulas written out by hand. No pack code is used here: these are the tests' references.

Reference SD-XL: `<out>/checkpoint-N/pytorch_lora_weights.safetensors` (metadata {"format": "pt"}), keys
`<processor path>.<to_q|to_k|to_v|to_out>_lora.<q_layer.weight|p_layer.weight|lambda_layer|base_q.weight|
base_p.weight|base_lambda>` or `...down.weight / up.weight`; settings in `<out>/logs/hparams.yml`.
Reference FLUX: `<out>/checkpoint-N/lora.pt` (torch.save of a flat dict), vanilla down/up per processor.
LyCORIS algo=tlora: `<name>.q_layer.weight`, `.p_layer.weight`, `.lambda_layer` [1, r], `.alpha` (0-dim).
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

SECRET = "wandb-key-DO-NOT-LEAK-1234567890"


def attention_shapes(processor: str, hidden: int, context: int):
    """(proj, in_features, out_features) of the four projections a reference processor adapts."""
    kv_in = context if processor.endswith("attn2.processor") else hidden
    return [("to_q", hidden, hidden), ("to_k", kv_in, hidden), ("to_v", kv_in, hidden), ("to_out", hidden, hidden)]


def ortho_tensors(prefix: str, n_in: int, n_out: int, rank: int, gen: torch.Generator) -> dict:
    """Trained q/p/λ plus DIFFERENT frozen copies, so the update is not zero."""
    base_q, base_p = torch.randn(rank, n_in, generator=gen), torch.randn(n_out, rank, generator=gen)
    base_lambda = torch.rand(1, rank, generator=gen) + 0.5
    return {f"{prefix}.q_layer.weight": base_q + 0.1 * torch.randn(base_q.shape, generator=gen),
            f"{prefix}.p_layer.weight": base_p + 0.1 * torch.randn(base_p.shape, generator=gen),
            f"{prefix}.lambda_layer": base_lambda + 0.1 * torch.rand(1, rank, generator=gen),
            f"{prefix}.base_q.weight": base_q, f"{prefix}.base_p.weight": base_p, f"{prefix}.base_lambda": base_lambda}


def vanilla_tensors(prefix: str, n_in: int, n_out: int, rank: int, gen: torch.Generator) -> dict:
    return {f"{prefix}.down.weight": torch.randn(rank, n_in, generator=gen) / rank,
            f"{prefix}.up.weight": 0.1 * torch.randn(n_out, rank, generator=gen)}


def sdxl_state(processors, rank: int, ortho: bool, hidden: int = 16, context: int = 12, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for proc in processors:
        for proj, n_in, n_out in attention_shapes(proc, hidden, context):
            make = ortho_tensors if ortho else vanilla_tensors
            out.update(make(f"{proc}.{proj}_lora", n_in, n_out, rank, gen))
    return out


def write_hparams(path: Path, fields: dict, secret: str = SECRET) -> Path:
    """A hparams.yml as yaml.dump(vars(args)) writes it, with an API key in clear text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"wandb_api_key: {secret}"] + [f"{k}: {v}" for k, v in fields.items()]
    lines.append("output_dir: /somewhere/private/run")
    path.write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
    return path


def write_sdxl_checkpoint(root: Path, state: dict, hparams: dict = None, step: int = 100) -> Path:
    path = root / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    if hparams is not None:
        write_hparams(root / "logs" / "hparams.yml", hparams)
    return path


def flux_state(double_blocks: int, single_blocks: int, hidden: int, rank: int, seed: int = 0) -> dict:
    """Every processor carries all seven adapters (the reference builds them all, even where unused)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    procs = [f"transformer_blocks.{i}.attn.processor" for i in range(double_blocks)]
    procs += [f"single_transformer_blocks.{i}.attn.processor" for i in range(single_blocks)]
    for proc in procs:
        for proj in ("to_q", "to_k", "to_v", "to_out", "to_q_proj", "to_k_proj", "to_v_proj"):
            out.update(vanilla_tensors(f"{proc}.{proj}_lora", hidden, hidden, rank, gen))
    return out


def write_flux_checkpoint(root: Path, state: dict, hparams: dict = None, step: int = 5) -> Path:
    path = root / f"checkpoint-{step}" / "lora.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(path))
    if hparams is not None:
        write_hparams(root / "logs" / "hparams.yml", hparams)
    return path


def lycoris_state(names_and_weights: dict, rank: int, alpha: float, seed: int = 0, sig_type: str = "principal"):
    """LyCORIS algo=tlora tensors for {lycoris name: pretrained W}: init from the SVD of W, then 'trained'.

    Returns (state dict as saved, frozen copies by name) - the copies are what LyCORIS keeps in memory only.
    """
    gen = torch.Generator().manual_seed(seed)
    state, frozen = {}, {}
    for name, w in names_and_weights.items():
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        sel = slice(0, rank) if sig_type == "principal" else slice(s.numel() - rank, s.numel())
        q0, p0, lam0 = vh[sel].float(), u[:, sel].float(), s[sel].float()[None]
        frozen[name] = (q0, p0, lam0)
        state[f"{name}.q_layer.weight"] = q0 + 0.05 * torch.randn(q0.shape, generator=gen)
        state[f"{name}.p_layer.weight"] = p0 + 0.05 * torch.randn(p0.shape, generator=gen)
        state[f"{name}.lambda_layer"] = lam0 * (1 + 0.1 * torch.rand(lam0.shape, generator=gen))
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state, frozen


# ---- the reference forward formulas, by hand ------------------------------------------------------------

def reference_sdxl_rank(t: float, rank: int, min_rank: int, alpha: float = 1.0) -> int:
    """ControlGenAI/T-LoRA SD-XL pipeline: int(((T - t) / T) ** alpha * (R - r_min)) + r_min, T = 1000."""
    return int(((1000 - t) / 1000) ** alpha * (rank - min_rank)) + min_rank


def reference_flux_rank(t: float, rank: int, min_rank: int) -> int:
    """Their FLUX pipeline: int((T - t) * (R - r_min) / T) + r_min with t = 1000 sigma."""
    return int((1000 - t) * (rank - min_rank) / 1000) + min_rank


def prefix(keep: int, rank: int) -> torch.Tensor:
    mask = torch.zeros(1, rank)
    mask[:, :keep] = 1.0
    return mask


def ortho_forward(x, state, key_prefix, mask):
    """p(q(x) * λ * mask) - p0(q0(x) * λ0 * mask), the reference OrthogonalLoRALinearLayer forward."""
    g = lambda n: state[f"{key_prefix}.{n}"].double()  # noqa: E731
    trained = F.linear(F.linear(x, g("q_layer.weight")) * g("lambda_layer") * mask, g("p_layer.weight"))
    frozen = F.linear(F.linear(x, g("base_q.weight")) * g("base_lambda") * mask, g("base_p.weight"))
    return trained - frozen


def vanilla_forward(x, state, key_prefix, mask):
    """up(down(x) * mask), the reference LoRALinearLayer forward."""
    return F.linear(F.linear(x, state[f"{key_prefix}.down.weight"].double()) * mask,
                    state[f"{key_prefix}.up.weight"].double())
