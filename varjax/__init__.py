"""varjax: variance-aware optimizers for JAX, as composable Optax transforms."""

from varjax import quantization, registry, roles
from varjax.alias import (
    adam_4bit,
    adam_8bit,
    adam_atan2,
    adamp,
    adamw_4bit,
    adamw_8bit,
    ademamix,
    ademamix_4bit,
    ademamix_8bit,
    adopt,
    cautious_adamw,
    diffgrad,
    grams,
    igt,
    lion_4bit,
    lion_8bit,
    mars_adamw,
    mars_lion,
    mars_shampoo,
    qhm,
    radam,
    simplified_ademamix,
)
from varjax.diagnostics import gradient_noise_scale, gradient_snr_monitor, state_bytes
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
from varjax.noise import agvm, autoclip, quantile_clipping, scale_by_gsnr
from varjax.precision import (
    bf16_adamw,
    bf16_adamw_8bit,
    in_float32,
    kahan_summation,
    low_precision_weights,
    split_mantissa,
    stochastic_rounding,
)
from varjax.quantization import quantize_state
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
from varjax.variance_reduction import (
    igt_eval_params,
    implicit_gradient_transport,
    mars_correction,
    mars_value_and_grad,
    multi_momentum,
    scale_by_mars,
    scale_by_qhm,
    scale_by_storm,
    storm,
)
from varjax.weight_rescaling import layer_index_rescaling, target_variance_rescaling

__version__ = "0.1.0"

# One entry per public name in varjax/registry.py; the imports above stay explicit for
# static tools and IDEs, and tests/test_registry.py checks the two against each other.
__all__ = sorted([*registry.names(), *registry.MODULES])
