"""The --4bit recipe: what makes QLoRA learn on a small, NF4-damaged base.

NF4 hurts a 135M model badly: on the ISO-date demo the NF4 base scores 2%
exact match (16-bit: 12%) and answers in prose. What we measured
(benchmarks/qlora_recipe.py, 1 epoch of the 600-example demo, r=16
all-linear, scored on 100 held-out dates; benchmarks/results/cpu/qlora_recipe.jsonl):

    variant                     adapter on NF4   adapter on 16-bit base
    lr 2e-4, all linears NF4         90%               84%
    lr 5e-4, all linears NF4         93%               89%      <- the recipe
    lr 5e-4, attention kept 16-bit   93%               90%      (more memory, no gain)

So plain QLoRA does learn here, provided the loss is taken on the answer
tokens only (trainer/data.py masks the prompt): the loss starts at 0.83 on the
NF4 base (0.52 in 16-bit) and falls below 0.02 within the epoch. What the
recipe changes is the learning rate: 5e-4 rather than 16-bit LoRA's 2e-4, to
also learn around NF4's rounding. LoftQ initialisation was not usable: PEFT's
``replace_lora_weights_loftq`` requires CUDA, and ``init_lora_weights="loftq"``
writes an adapter vLLM refuses (it rewrites base weights at load time).

An adapter trained on the NF4 base keeps most of its accuracy on the 16-bit
base (89% vs 93% above); the server may serve either.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QLoRARecipe:
    lr: float = 5e-4
    """Peak learning rate used when --lr is not given."""
    keep_16bit: tuple[str, ...] = ()
    """Module-name suffixes left unquantized (bitsandbytes' skip list). Empty: every target linear is NF4."""

    def as_dict(self) -> dict:
        return asdict(self)


RECIPE = QLoRARecipe()


def bnb_skip_modules(recipe: QLoRARecipe) -> list[str] | None:
    return ["lm_head", *recipe.keep_16bit] if recipe.keep_16bit else None
