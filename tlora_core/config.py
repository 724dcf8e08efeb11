"""Settings of one T-LoRA: a dataclass that validates itself and doubles as the file's metadata."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from .errors import TLoraConfigError
from .schedule import DEFAULT_T

# variant -> (orthogonal init with frozen base subtracted, rank mask follows t)
VARIANTS = {
    "tlora": (True, True),          # full T-LoRA: Ortho-LoRA init + timestep mask (the paper)
    "vanilla_tlora": (False, True),  # plain LoRA init + timestep mask
    "ortho_lora": (True, False),    # Ortho-LoRA init, full rank at every t
    "lora": (False, False),         # plain LoRA, full rank at every t
}
ORTHO_INITS = ("last", "middle", "principal")
MAX_TIMESTEP = 100_000  # diffusion models use T = 1000; far larger values only overflow the samplers' maths


TEXT_FIELDS = ("variant", "init", "base_model", "family", "trigger", "class_word", "source")


def whole_number(value) -> bool:
    """An int that is not a bool (True would pass as rank 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def finite_number(value) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TLoraConfig:
    """Everything needed besides the tensors to reproduce a T-LoRA's inference exactly."""

    rank: int = field(default=64, metadata={"help": "number of low-rank components r"})
    min_rank: int = field(default=32, metadata={"help": "r_min: components kept at the highest noise"})
    exponent: float = field(default=1.0, metadata={"help": "bends r(t); 1 is the paper's straight line"})
    max_timestep: int = field(default=DEFAULT_T, metadata={"help": "T of the schedule r(t), Sec. 3.2"})
    variant: str = field(default="tlora", metadata={"help": "one of " + ", ".join(VARIANTS)})
    init: str = field(default="last", metadata={"help": "ortho init: last | middle | principal"})
    base_model: str = field(default="", metadata={"help": "ComfyUI config class trained on, e.g. SD15, SDXL, Flux"})
    family: str = field(default="", metadata={"help": "model family (tlora_core.families), e.g. SD-XL, Flux"})
    trigger: str = field(default="", metadata={"help": "trigger word used in training prompts"})
    class_word: str = field(default="", metadata={"help": "class noun of the subject, e.g. dog"})
    source: str = field(default="", metadata={"help": "where the tensors came from (trainer, reader name)"})
    training: dict = field(default_factory=dict, metadata={"help": "training settings, for the record"})
    fused: dict = field(default_factory=dict, metadata={
        "help": "layer key -> [module path, row offset, rows, all rows] for adapters on a slice of a fused "
                "weight (one projection of Flux's qkv, say); whole-weight layers are not listed"})

    def refuse(self, name: str, why: str):
        """Raise the settings error for one field: its name and value first, then what to do."""
        raise TLoraConfigError(f"{name} = {getattr(self, name)!r}: {why}")

    def __post_init__(self):
        bad = self.refuse
        for name in TEXT_FIELDS:
            if not isinstance(getattr(self, name), str):
                bad(name, "must be text.")
        if not isinstance(self.training, dict):
            bad("training", "must be a mapping of settings.")
        self._check_fused()
        if not whole_number(self.rank) or self.rank < 1:
            bad("rank", "must be a whole number >= 1.")
        if not whole_number(self.min_rank) or not 1 <= self.min_rank <= self.rank:
            bad("min_rank", f"r_min must be a whole number between 1 and rank ({self.rank}). "
                            f"Use r_min = rank // 2 (the paper's default) or lower it for more diversity.")
        if not (finite_number(self.exponent) and self.exponent > 0):
            bad("exponent", "the schedule exponent must be a finite number > 0.")
        self.exponent = float(self.exponent)
        if not whole_number(self.max_timestep) or not 1 <= self.max_timestep <= MAX_TIMESTEP:
            bad("max_timestep", f"T must be a whole number from 1 to {MAX_TIMESTEP} (T-LoRA uses {DEFAULT_T}). Set it "
                                f"to {DEFAULT_T} or use the original file.")
        if self.variant not in VARIANTS:
            bad("variant", f"choose one of {', '.join(VARIANTS)}.")
        if self.ortho and self.init not in ORTHO_INITS:
            bad("init", f"choose one of {', '.join(ORTHO_INITS)}.")

    def _check_fused(self):
        if not isinstance(self.fused, dict):
            raise TLoraConfigError(f"fused must be a mapping of layer keys, got {self.fused!r}.")
        for key, value in self.fused.items():
            ok = (isinstance(key, str) and isinstance(value, (list, tuple)) and len(value) == 4
                  and isinstance(value[0], str) and all(whole_number(v) for v in value[1:]))
            if not ok or not (0 <= value[1] and 1 <= value[2] and value[1] + value[2] <= value[3]):
                raise TLoraConfigError(f"fused entry {key!r} = {value!r} is not [module path, row offset, rows, "
                                       f"all rows] with the rows inside the weight.")
        self.fused = {key: list(value) for key, value in self.fused.items()}

    @property
    def ortho(self) -> bool:
        """True when the factors start orthogonal and the frozen initial product is subtracted (Eq. 5, Sec. 3.3;
        with the mask, Eq. 6)."""
        return VARIANTS[self.variant][0]

    @property
    def masked(self) -> bool:
        """True when the rank mask follows the timestep; False keeps full rank at every t."""
        return VARIANTS[self.variant][1]

    @property
    def schedule_min_rank(self) -> int:
        """The r_min the schedule really uses: unmasked variants keep the full rank everywhere."""
        return self.min_rank if self.masked else self.rank

    def replace(self, **changes) -> "TLoraConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TLoraConfig":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise TLoraConfigError(f"T-LoRA settings are not valid JSON ({type(exc).__name__}: {exc}).") from exc
        if not isinstance(data, dict):
            raise TLoraConfigError("T-LoRA settings must be a JSON object.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TLoraConfigError(
                f"T-LoRA settings hold unknown fields {unknown}: the file was written by a newer version "
                f"of this pack; update the pack.")
        return cls(**data)
