"""The --4bit recipe: what makes QLoRA learn on a small, NF4-damaged base.

(Recipe under evaluation.)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QLoRARecipe:
    lr: float = 2e-4
    """Peak learning rate used when --lr is not given."""
    keep_16bit: tuple[str, ...] = ()
    """Module-name suffixes left unquantized (bitsandbytes' skip list)."""

    def as_dict(self) -> dict:
        return asdict(self)


RECIPE = QLoRARecipe()


def bnb_skip_modules(recipe: QLoRARecipe) -> list[str] | None:
    return ["lm_head", *recipe.keep_16bit] if recipe.keep_16bit else None


def prepare_4bit(model, precision):
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing trades compute for activation memory; on CPU the
    # activations are small next to host RAM and the recompute costs ~30%.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=precision.device == "cuda")
