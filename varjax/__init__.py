"""varjax: variance-aware optimizers for JAX, as composable Optax transforms."""

from varjax.alias import adam_atan2, adamp, adopt, cautious_adamw, diffgrad, grams, radam
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
    "adopt",
    "cautious",
    "cautious_adamw",
    "diffgrad",
    "grams",
    "radam",
    "rectification",
    "rectify",
    "scale_by_adam_atan2",
    "scale_by_adamp",
    "scale_by_adopt",
    "scale_by_diffgrad",
    "scale_by_grams",
    "scale_by_radam",
]
