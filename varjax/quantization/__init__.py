"""Blockwise quantized optimizer state (Dettmers et al., 2022, "8-bit Optimizers via
Block-wise Quantization"): the quantization codes and block-wise absmax quantization.

[`quantize_state`][varjax.quantize_state] keeps any transform's state in 8 or 4 bits between steps;
the ready ``varjax.adam_8bit``, ``adamw_8bit``, ``lion_8bit``, ``ademamix_8bit``
and their 4-bit variants use it.

Examples:
  >>> import jax.numpy as jnp
  >>> from varjax.quantization import dynamic_map, quantize_blockwise, dequantize_blockwise
  >>> moments = jnp.linspace(-3.0, 3.0, 1000)
  >>> codes, absmax = quantize_blockwise(moments, dynamic_map(signed=True), block_size=256)
  >>> codes.nbytes + absmax.nbytes  # against 4000 bytes in float32
  1016
  >>> error = jnp.abs(dequantize_blockwise(codes, absmax, dynamic_map(), 256) - moments)
  >>> bool(error.max() < 0.03)
  True
"""

from varjax.diagnostics import state_bytes
from varjax.quantization import optax_roles
from varjax.quantization.blockwise import (
    dequantize_blockwise,
    nearest_index,
    pack_4bit,
    quantize_blockwise,
    unpack_4bit,
)
from varjax.quantization.codes import default_maps, dynamic_map, linear_map
from varjax.quantization.wrapper import (
    QuantizedArray,
    QuantizedState,
    UndeclaredRoleWarning,
    quantize_state,
)
from varjax.roles import Role, register_roles

__all__ = [
    "QuantizedArray",
    "QuantizedState",
    "Role",
    "UndeclaredRoleWarning",
    "default_maps",
    "dequantize_blockwise",
    "dynamic_map",
    "linear_map",
    "nearest_index",
    "optax_roles",
    "pack_4bit",
    "quantize_blockwise",
    "quantize_state",
    "register_roles",
    "state_bytes",
    "unpack_4bit",
]
