"""Settings of one training run: a dataclass that validates itself and is stored in the file's metadata."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..tlora_core.config import ORTHO_INITS, VARIANTS
from ..tlora_core.errors import TLoraConfigError
from ..tlora_core.families import TARGET_SETS
from ..tlora_core.format import STORAGE_DTYPES

TRAINING_DTYPES = ("auto", "fp32", "bf16", "fp16")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainSettings:
    """The paper's SD-XL recipe as defaults: rank 64, r_min 32, AdamW 1e-4, wd 1e-4, batch 1, 800 steps."""

    variant: str = field(default="tlora", metadata={"help": "tlora | vanilla_tlora | ortho_lora | lora"})
    rank: int = 64
    min_rank: int = 32
    exponent: float = 1.0
    init: str = field(default="last", metadata={"help": "ortho init: last | middle | principal"})
    steps: int = 800
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    resolution: int = field(default=0, metadata={"help": "0: the model family's native size (paper: centre crop + resize)"})
    targets: str = "attention"
    gradient_checkpointing: bool = False
    training_dtype: str = "auto"
    save_every: int = field(default=0, metadata={"help": "also save every N steps; 0 saves at the end only"})
    storage: str = field(default="fp16", metadata={"help": "number format of the saved file: fp16, bf16, fp32"})
    prompt: str = "a photo of sks dog"
    trigger: str = "sks"
    class_word: str = "dog"

    def __post_init__(self):
        def bad(name, why):
            raise TLoraConfigError(f"{name} = {getattr(self, name)!r}: {why}")

        if self.variant not in VARIANTS:
            bad("variant", f"choose one of {', '.join(VARIANTS)}.")
        if self.init not in ORTHO_INITS:
            bad("init", f"choose one of {', '.join(ORTHO_INITS)}.")
        if not isinstance(self.rank, int) or self.rank < 1:
            bad("rank", "must be a whole number >= 1.")
        if not isinstance(self.min_rank, int) or not 1 <= self.min_rank <= self.rank:
            bad("min_rank", f"r_min must be between 1 and rank ({self.rank}).")
        if not _whole(self.steps) or self.steps < 1:
            bad("steps", "train for at least 1 step.")
        if not (_finite(self.learning_rate) and self.learning_rate > 0):
            bad("learning_rate", "must be a finite number > 0 (the paper uses 1e-4).")
        if not (_finite(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "must be a finite number >= 0.")
        if not (_finite(self.exponent) and self.exponent > 0):
            bad("exponent", "must be a finite number > 0.")
        if not _whole(self.batch_size) or self.batch_size < 1:
            bad("batch_size", "must be >= 1.")
        if self.targets not in TARGET_SETS:
            bad("targets", f"choose one of {', '.join(TARGET_SETS)}.")
        if self.training_dtype not in TRAINING_DTYPES:
            bad("training_dtype", f"choose one of {', '.join(TRAINING_DTYPES)}.")
        if self.storage not in STORAGE_DTYPES:
            bad("storage", f"choose one of {', '.join(STORAGE_DTYPES)}.")
        if not _whole(self.save_every) or self.save_every < 0:
            bad("save_every", "must be >= 0.")

    def record(self) -> dict:
        """The settings as stored in the file's metadata."""
        return dataclasses.asdict(self)
