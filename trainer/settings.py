"""Settings of one training run: the T-LoRA's own settings (TLoraConfig) plus how to train it.

A TrainSettings IS a TLoraConfig (rank, r_min, exponent, T, variant, init and their checks live there
once); it adds the optimiser, data and saving settings and checks them the same way. Its `record()`
is what the saved file keeps as `TLoraConfig.training`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..tlora_core.config import TLoraConfig, finite_number, whole_number
from ..tlora_core.families import AUTO, CROPS, OPTIMIZERS, SIGMA_DRAWS, TARGET_SETS, Recipe
from ..tlora_core.format import STORAGE_DTYPES

TRAINING_DTYPES = ("auto", "fp32", "bf16", "fp16")
# TLoraConfig fields that describe the file, not the run: set when the T-LoRA is made, never recorded
FILE_FIELDS = ("base_model", "family", "source", "training", "fused")


@dataclass
class TrainSettings(TLoraConfig):
    """The paper's SD-XL recipe as defaults: rank 64, r_min 32, wd 1e-4, batch 1, 800 steps; "auto" (and a
    learning rate of 0) stand for the model family's recipe until `for_recipe` fills them in."""

    trigger: str = "sks"
    class_word: str = "dog"
    steps: int = 800
    optimizer: str = field(default=AUTO, metadata={"help": "auto (the family's recipe), " + ", ".join(OPTIMIZERS)})
    learning_rate: float = field(default=0.0, metadata={"help": "0: the optimiser's recipe (AdamW 1e-4, Prodigy 1.0)"})
    weight_decay: float = 1e-4
    max_grad_norm: float = field(default=-1.0, metadata={
        "help": "clip gradients to this norm; 0: never; -1: the optimiser's recipe (Prodigy 1.0, AdamW none)"})
    sigma_draw: str = field(default=AUTO, metadata={"help": "auto (the family's recipe), " + ", ".join(SIGMA_DRAWS)})
    crop: str = field(default=AUTO, metadata={"help": "auto (the family's recipe), " + ", ".join(CROPS)})
    batch_size: int = 1
    seed: int = 0
    resolution: int = field(default=0, metadata={"help": "0: the model family's native size (paper: centre crop + resize)"})
    targets: str = "attention"
    gradient_checkpointing: bool = False
    training_dtype: str = "auto"
    save_every: int = field(default=100, metadata={
        "help": "also save every N steps, as both reference recipes checkpoint every 100; 0 saves at the end only"})
    storage: str = field(default="fp16", metadata={"help": "number format of the saved file: fp16, bf16, fp32"})
    prompt: str = "a photo of sks dog"

    def __post_init__(self):
        super().__post_init__()
        bad = self.refuse
        if not whole_number(self.steps) or self.steps < 1:
            bad("steps", "train for at least 1 step.")
        if not (finite_number(self.learning_rate) and self.learning_rate >= 0):
            bad("learning_rate", "must be a finite number >= 0 (0: the optimiser's recipe; the paper's AdamW uses "
                                 "1e-4, the reference FLUX code's Prodigy 1.0).")
        if not (finite_number(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "must be a finite number >= 0.")
        if not (finite_number(self.max_grad_norm) and (self.max_grad_norm >= 0 or self.max_grad_norm == -1)):
            bad("max_grad_norm", "must be >= 0 (0: no clipping) or -1 (the optimiser's recipe).")
        for name, known in (("optimizer", tuple(OPTIMIZERS)), ("sigma_draw", SIGMA_DRAWS), ("crop", CROPS)):
            if getattr(self, name) not in (AUTO, *known):
                bad(name, f"choose one of {', '.join((AUTO, *known))}.")
        if not whole_number(self.batch_size) or self.batch_size < 1:
            bad("batch_size", "must be >= 1.")
        if self.targets not in TARGET_SETS:
            bad("targets", f"choose one of {', '.join(TARGET_SETS)}.")
        if self.training_dtype not in TRAINING_DTYPES:
            bad("training_dtype", f"choose one of {', '.join(TRAINING_DTYPES)}.")
        if self.storage not in STORAGE_DTYPES:
            bad("storage", f"choose one of {', '.join(STORAGE_DTYPES)}.")
        if not whole_number(self.save_every) or self.save_every < 0:
            bad("save_every", "must be >= 0.")
        if not isinstance(self.prompt, str):
            bad("prompt", "must be text.")

    def for_recipe(self, recipe: Recipe) -> "TrainSettings":
        """These settings with every "auto" (and learning rate 0, clipping -1) filled in from a family's
        recipe; an optimiser chosen by hand brings its own learning rate and clipping."""
        optimizer = recipe.optimizer if self.optimizer == AUTO else self.optimizer
        spec = OPTIMIZERS[optimizer]
        return dataclasses.replace(
            self, optimizer=optimizer, learning_rate=self.learning_rate or spec.learning_rate,
            max_grad_norm=spec.max_grad_norm if self.max_grad_norm == -1 else self.max_grad_norm,
            sigma_draw=recipe.sigma_draw if self.sigma_draw == AUTO else self.sigma_draw,
            crop=recipe.crop if self.crop == AUTO else self.crop)

    def record(self) -> dict:
        """The settings as stored in the file's metadata (TLoraConfig.training)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in FILE_FIELDS}

    def tlora_config(self, **file_fields) -> TLoraConfig:
        """The T-LoRA's own settings for a file made by this run, with this run as its training record;
        file_fields: base_model, family, source, fused (FILE_FIELDS but training)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(TLoraConfig) if f.name not in FILE_FIELDS}
        return TLoraConfig(**own, **file_fields, training=self.record())
