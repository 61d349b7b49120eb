"""varjax: variance-aware optimizers for JAX, as composable Optax transforms."""

from varjax.alias import (
    adam_atan2,
    adamp,
    ademamix,
    adopt,
    cautious_adamw,
    diffgrad,
    grams,
    radam,
    simplified_ademamix,
)
from varjax.multi_ema import (
    ademamix_alpha_schedule,
    ademamix_beta3_schedule,
    grokfast_ema,
    grokfast_ma,
    multi_ema,
    scale_by_ademamix,
    scale_by_second_moment,
    scale_by_simplified_ademamix,
)
from varjax.rectification import (
    cautious,
    rectification,
    rectify,
    scale_by_adam_atan2,
    scale_by_adamp,
    scale_by_adopt,
    scale_by_diffgrad,
    scale_by_grams,
    scale_by_radam,
)

__version__ = "0.1.0"

__all__ = [
    "adam_atan2",
    "adamp",
    "ademamix",
    "ademamix_alpha_schedule",
    "ademamix_beta3_schedule",
    "adopt",
    "cautious",
    "cautious_adamw",
    "diffgrad",
    "grams",
    "grokfast_ema",
    "grokfast_ma",
    "multi_ema",
    "radam",
    "rectification",
    "rectify",
    "scale_by_adam_atan2",
    "scale_by_adamp",
    "scale_by_ademamix",
    "scale_by_adopt",
    "scale_by_diffgrad",
    "scale_by_grams",
    "scale_by_radam",
    "scale_by_second_moment",
    "scale_by_simplified_ademamix",
    "simplified_ademamix",
]
