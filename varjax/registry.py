"""One entry per public varjax optimizer and building block.

The public names (``varjax.__all__``), the shared test battery
(``tests/test_battery.py``), the step-time benchmark (``benchmarks/step_time.py``),
the comparison job (``python -m varjax compare``: its known names, default
learning rates and ``--help``) and the checks of the docs pages and the README
table all read this list. Adding a method is its transform plus one entry here
(see CONTRIBUTING.md).

Examples:
  >>> entry = ENTRIES["mars_lion"]
  >>> entry.kind, entry.page, entry.rate_multiplier
  ('optimizer', 'variance_reduction.md', 0.3333333333333333)
  >>> entry.factory is __import__("varjax").mars_lion
  True
  >>> [case.name for case in ENTRIES["radam"].battery]
  ['radam', 'radam_amsgrad']
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "ENTRIES",
    "KINDS",
    "MODULES",
    "REGISTRY",
    "Baseline",
    "Battery",
    "Entry",
    "names",
]

# What an entry is; ``optimizer``: a ready optimizer (an ``optax`` alias, usually taking
# ``learning_rate``); ``block``: a transform to chain (``scale_by_*``, filters, clippers);
# ``wrapper``: a transform around another transform; ``schedule``: an ``optax.Schedule``
# factory; ``diagnostic``: a monitor or a measurement; ``function``: a helper that is not a
# transform (an initializer, a gradient function, a formula).
KINDS = ("optimizer", "block", "wrapper", "schedule", "diagnostic", "function")

# Public names that are modules, not entries.
MODULES = ("quantization", "roles")


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A line of ``benchmarks/step_time.py``: the entry timed against an Optax optimizer.

    Attributes:
      optax: the dotted path of the baseline's factory, e.g. ``"optax.contrib.muon"``.
      label: the row's name; ``""``: the entry's name.
      kwargs: keyword arguments of the entry besides the learning rate.
      optax_kwargs: keyword arguments of the baseline besides the learning rate.
      optax_label: the baseline's name in the table; ``""``: ``optax``.
    """

    optax: str
    label: str = ""
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optax_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optax_label: str = ""


@dataclasses.dataclass(frozen=True)
class Battery:
    """One case of the shared battery in ``tests/test_battery.py``.

    Attributes:
      name: the case's name (its test ids).
      learning_rate: the learning rate of the minimisation checks.
      kwargs: keyword arguments given to the entry's factory unless the test gives its own.
      adapt: how the test makes an optimizer of the factory, a key of the battery's
        ``ADAPTERS``: ``"optimizer"`` (the factory takes ``learning_rate``), ``"rate"``
        (a building block followed by the learning rate), ``"then_adam"`` (chained
        before ``optax.adam``), ``"exact_form"`` (``previous_grads`` supplied), ...
      inner: for a wrapper, the transform it wraps, a key of the battery's ``INNER``.
      to_inner: the test's keyword arguments go to ``inner`` rather than the wrapper.
      bad: ``(argument, value)`` pairs that must raise ``ValueError`` naming the argument.
      sharded: also run on 8 host devices by ``tests/test_integration.py`` (one case per
        kind of state: the slowest test of the suite).
      float32_updates: bfloat16 and float16 leaves get float32 updates, so that
        ``optax.apply_updates`` lands exactly on the rounded weight (``varjax.precision``);
        ``optax.apply_if_finite`` then goes inside, around the update rule.
    """

    name: str
    learning_rate: float = 0.1
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    adapt: str = "optimizer"
    inner: str | None = None
    to_inner: bool = False
    bad: tuple[tuple[str, Any], ...] = ()
    sharded: bool = False
    float32_updates: bool = False


@dataclasses.dataclass(frozen=True)
class Entry:
    """A public varjax name.

    Attributes:
      name: the public name, ``varjax.<name>``.
      module: the module defining it, under ``varjax``.
      kind: one of ``KINDS``.
      family: its family, as the README's methods table names it.
      page: the docs page (under ``docs/``) that documents it with ``::: varjax.<name>``.
      rate_multiplier: the comparison job's default learning rate is the task's AdamW
        rate times this (ready optimizers only).
      baselines: its lines in ``benchmarks/step_time.py``.
      battery: its cases in the shared battery.
      tests: the test modules (under ``tests/``) with its reference or peer checks.
    """

    name: str
    module: str
    kind: str
    family: str
    page: str
    rate_multiplier: float = 1.0
    baselines: tuple[Baseline, ...] = ()
    battery: tuple[Battery, ...] = ()
    tests: tuple[str, ...] = ()

    @property
    def factory(self) -> Callable[..., Any]:
        """The public object, ``varjax.<name>``."""
        return getattr(importlib.import_module(f"varjax.{self.module}"), self.name)


ADAM_BAD = (("b1", 1.0), ("b2", -0.1), ("eps", -1e-8), ("learning_rate", -1.0))
BLOCK_BAD = (("b1", 1.5), ("b2", 1.0), ("eps", -1.0))
MARS_BAD = (*ADAM_BAD, ("gamma", -0.1), ("max_norm", -1.0), ("norm_scope", "layer"))

ADAM = Baseline("optax.adam")
ADAMW = Baseline("optax.adamw")
LION = Baseline("optax.lion")
SGD = Baseline("optax.sgd", optax_kwargs={"momentum": 0.9}, optax_label="optax.sgd(momentum)")

_RECT = {"module": "rectification", "family": "rectification", "page": "rectification.md"}
_ALIAS_RECT = {**_RECT, "module": "alias", "kind": "optimizer", "tests": ("test_rectification.py",)}
_BLOCK_RECT = {**_RECT, "kind": "block", "tests": ("test_rectification.py",)}
_MULTI = {"module": "multi_ema", "family": "multi-EMA", "page": "multi_ema.md"}
_VR = {"module": "variance_reduction", "family": "variance reduction"}
_VR |= {"page": "variance_reduction.md", "tests": ("test_variance_reduction.py",)}
_QUANT = {"module": "alias", "kind": "optimizer", "family": "quantized state"}
_QUANT |= {"page": "quantization.md", "tests": ("test_quantization.py",)}
_LOW = {"module": "precision", "family": "low-precision weights", "page": "precision.md"}
_LOW |= {"tests": ("test_precision.py",)}
_NOISE = {"module": "noise", "page": "noise.md", "tests": ("test_noise.py",)}
_DIAG = {"module": "diagnostics", "kind": "diagnostic", "family": "diagnostics"}
_DIAG |= {"page": "diagnostics.md", "tests": ("test_diagnostics.py",)}
_RESCALE = {"module": "weight_rescaling", "family": "weight rescaling"}
_RESCALE |= {"page": "weight_rescaling.md", "tests": ("test_weight_rescaling.py",)}

REGISTRY: tuple[Entry, ...] = (
    # --- rectification and adaptive-step corrections --------------------------------------
    Entry(
        "radam",
        **_ALIAS_RECT,
        baselines=(
            Baseline("optax.radam"),
            Baseline("optax.amsgrad", label="radam(amsgrad)", kwargs={"amsgrad": True}),
        ),
        battery=(
            Battery(
                "radam", bad=(*ADAM_BAD, ("threshold", 3.0), ("weight_decay", -1.0)), sharded=True
            ),
            Battery("radam_amsgrad", 0.2, {"amsgrad": True}, bad=ADAM_BAD),
        ),
    ),
    Entry(
        "adopt",
        **_ALIAS_RECT,
        baselines=(Baseline("optax.contrib.adopt"),),
        battery=(Battery("adopt", 0.2, bad=(*ADAM_BAD, ("clip_exponent", -1.0)), sharded=True),),
    ),
    Entry("grams", **_ALIAS_RECT, baselines=(ADAM,), battery=(Battery("grams", bad=ADAM_BAD),)),
    Entry(
        "diffgrad", **_ALIAS_RECT, baselines=(ADAM,), battery=(Battery("diffgrad", bad=ADAM_BAD),)
    ),
    Entry(
        "adamp",
        **_ALIAS_RECT,
        baselines=(ADAM,),
        battery=(Battery("adamp", bad=(*ADAM_BAD, ("delta", -0.1), ("wd_ratio", -1.0))),),
    ),
    Entry(
        "adam_atan2",
        **_ALIAS_RECT,
        baselines=(ADAM,),
        battery=(Battery("adam_atan2", bad=(("b1", 1.0), ("a", 0.0), ("b", -1.0))),),
    ),
    Entry(
        "cautious_adamw",
        **_ALIAS_RECT,
        baselines=(ADAMW,),
        battery=(Battery("cautious_adamw", bad=ADAM_BAD),),
    ),
    Entry(
        "scale_by_radam",
        **_BLOCK_RECT,
        battery=(Battery("scale_by_radam", adapt="rate", bad=(*BLOCK_BAD, ("eps_root", -1))),),
    ),
    Entry(
        "scale_by_adopt",
        **_BLOCK_RECT,
        battery=(Battery("scale_by_adopt", 0.2, adapt="rate", bad=BLOCK_BAD),),
    ),
    Entry(
        "scale_by_grams",
        **_BLOCK_RECT,
        battery=(Battery("scale_by_grams", adapt="rate", bad=BLOCK_BAD),),
    ),
    Entry(
        "scale_by_diffgrad",
        **_BLOCK_RECT,
        battery=(Battery("scale_by_diffgrad", adapt="rate", bad=BLOCK_BAD),),
    ),
    Entry(
        "scale_by_adamp",
        **_BLOCK_RECT,
        battery=(Battery("scale_by_adamp", adapt="rate", bad=BLOCK_BAD),),
    ),
    Entry(
        "scale_by_adam_atan2",
        **_BLOCK_RECT,
        battery=(Battery("scale_by_adam_atan2", adapt="rate", bad=(("b2", 1.0),)),),
    ),
    Entry(
        "rectify",
        **{**_BLOCK_RECT, "kind": "wrapper"},
        battery=(
            Battery(
                "rectify_adam",
                adapt="rate",
                inner="adam",
                bad=(("b1", -0.5), ("b2", 1.0), ("threshold", 0.0), ("fallback", "adam")),
            ),
            Battery(
                "rectify_diffgrad_sgd", adapt="rate", inner="diffgrad", kwargs={"fallback": "sgd"}
            ),
            Battery("rectify_ademamix", adapt="rate", inner="slow_ademamix"),
        ),
    ),
    Entry(
        "cautious",
        **{**_BLOCK_RECT, "kind": "wrapper"},
        battery=(
            Battery(
                "cautious_ademamix",
                adapt="rate",
                inner="slow_ademamix",
                to_inner=True,
                bad=(("alpha", -1.0),),
            ),
            Battery("cautious_lion", adapt="rate", inner="lion", to_inner=True),
        ),
    ),
    Entry("rectification", **{**_BLOCK_RECT, "kind": "function"}),
    # --- multi-EMA and gradient filters ---------------------------------------------------
    Entry(
        "ademamix",
        **{**_MULTI, "module": "alias"},
        kind="optimizer",
        tests=("test_multi_ema.py",),
        baselines=(Baseline("optax.contrib.ademamix"),),
        battery=(
            Battery("ademamix", bad=(*ADAM_BAD, ("b3", 1.0), ("alpha", -1.0)), sharded=True),
            # b3 = 0.9999 has a 6931-step half-life, longer than the battery's problems
            Battery(
                "ademamix_warmup",
                kwargs={"b3": 0.999, "alpha_warmup_steps": 500, "b3_warmup_steps": 500},
                bad=(("alpha_warmup_steps", 0), ("b1", 0.0)),
            ),
        ),
    ),
    Entry(
        "simplified_ademamix",
        **{**_MULTI, "module": "alias"},
        kind="optimizer",
        tests=("test_multi_ema.py",),
        # the momentum sums gradients: about 1 / (1 - b1) = 100 times an EMA (and Adam's step)
        rate_multiplier=1 / 100,
        battery=(
            Battery(
                "simplified_ademamix",
                0.001,
                {"alpha": 2.0},
                bad=(("b1", 1.0), ("b2", 1.0), ("alpha", -1.0), ("eps", -1.0)),
            ),
        ),
    ),
    Entry(
        "scale_by_ademamix",
        **_MULTI,
        kind="block",
        tests=("test_multi_ema.py",),
        battery=(Battery("scale_by_ademamix", adapt="rate", bad=(("b2", 1.0), ("b3", -0.1))),),
    ),
    Entry("scale_by_simplified_ademamix", **_MULTI, kind="block", tests=("test_multi_ema.py",)),
    Entry("ademamix_alpha_schedule", **_MULTI, kind="schedule", tests=("test_multi_ema.py",)),
    Entry("ademamix_beta3_schedule", **_MULTI, kind="schedule", tests=("test_multi_ema.py",)),
    Entry("multi_ema", **_MULTI, kind="block", tests=("test_multi_ema.py",)),
    Entry(
        "scale_by_second_moment",
        **_MULTI,
        kind="wrapper",
        tests=("test_multi_ema.py",),
        battery=(
            Battery(
                "second_moment_multi_ema",
                adapt="rate",
                inner="two_emas",
                bad=(("b2", 1.5), ("eps", -1.0), ("eps_root", -1.0)),
            ),
        ),
    ),
    Entry(
        "grokfast_ema",
        **_MULTI,
        kind="block",
        tests=("test_multi_ema.py",),
        battery=(
            Battery(
                "grokfast_ema_then_adam",
                adapt="then_adam",
                bad=(("alpha", 1.0), ("lamb", float("nan"))),
            ),
        ),
    ),
    Entry(
        "grokfast_ma",
        **_MULTI,
        kind="block",
        tests=("test_multi_ema.py",),
        battery=(
            # a lagged window average fights Rosenbrock's curved valley: lamb 1, not 5
            Battery(
                "grokfast_ma_then_adam",
                0.02,
                {"window": 8, "lamb": 1.0},
                adapt="then_adam",
                bad=(("lamb", float("nan")), ("window", 0)),
            ),
        ),
    ),
    # --- variance-reduced momentum --------------------------------------------------------
    Entry(
        "mars_adamw",
        **{**_VR, "module": "alias"},
        kind="optimizer",
        baselines=(ADAMW,),
        battery=(
            Battery(
                "mars_adamw",
                bad=(
                    *MARS_BAD,
                    ("b1_1d", 1.0),
                    ("weight_decay", -1),
                    ("weight_decay_1d", -1.0),
                    ("learning_rate_1d", -1.0),
                ),
                sharded=True,
            ),
            Battery("mars_adamw_all_leaves", kwargs={"optimize_1d": True}),
            Battery(
                "mars_adamw_exact_clip_global",
                kwargs={"exact": True, "norm_scope": "global", "optimize_1d": True},
                adapt="exact_form",
            ),
        ),
    ),
    Entry(
        "mars_lion",
        **{**_VR, "module": "alias"},
        kind="optimizer",
        # sign updates are +-1 per element: Lion's rule of thumb is a 3-10x smaller rate
        rate_multiplier=1 / 3,
        baselines=(LION,),
        battery=(Battery("mars_lion", 0.02, {"optimize_1d": True}, bad=MARS_BAD),),
    ),
    Entry(
        "mars_shampoo",
        **{**_VR, "module": "alias"},
        kind="optimizer",
        # orthogonalised (Newton-Schulz) steps are smaller per element
        rate_multiplier=3.0,
        baselines=(Baseline("optax.contrib.muon"),),
        battery=(Battery("mars_shampoo", bad=MARS_BAD, sharded=True),),
    ),
    Entry(
        "scale_by_mars",
        **_VR,
        kind="block",
        battery=(Battery("scale_by_mars", adapt="rate", bad=(*BLOCK_BAD, ("ns_steps", 0))),),
    ),
    Entry(
        "mars_correction",
        **_VR,
        kind="block",
        battery=(
            Battery(
                "mars_correction_then_lion",
                0.02,
                adapt="then_lion",
                bad=(("gamma", -1.0), ("b1", 1.0), ("max_norm", 0.0), ("norm_scope", "layer")),
            ),
            Battery("mars_correction_then_ademamix", kwargs={"b1": 0.9}, adapt="then_ademamix"),
        ),
    ),
    Entry("mars_value_and_grad", **_VR, kind="function"),
    Entry(
        "qhm",
        **{**_VR, "module": "alias"},
        kind="optimizer",
        # plain (momentum) SGD steps are not normalised per element
        rate_multiplier=100.0,
        baselines=(SGD,),
        battery=(
            # b = 0.99: the paper's b = 0.999 lags for hundreds of steps, too long here
            Battery(
                "qhm",
                0.01,
                {"b": 0.99},
                bad=(("b", -0.1), ("nu", 1.5), ("learning_rate", -1.0)),
                sharded=True,
            ),
        ),
    ),
    Entry(
        "scale_by_qhm",
        **_VR,
        kind="block",
        battery=(Battery("scale_by_qhm", 0.01, {"b": 0.99}, adapt="rate"),),
    ),
    Entry(
        "igt",
        **{**_VR, "module": "alias"},
        kind="optimizer",
        # not normalised per element either; IGT diverges at 100x
        rate_multiplier=30.0,
        baselines=(dataclasses.replace(SGD, kwargs={"gamma": 0.9}),),
        battery=(
            # heavy-ball IGT: the anytime average (gamma=None) is exact on quadratics only
            # and stalls on Rosenbrock; it is checked against its reference instead
            Battery("igt_heavy_ball", 0.005, {"gamma": 0.9}, bad=(("gamma", 1.0),), sharded=True),
        ),
    ),
    Entry("implicit_gradient_transport", **_VR, kind="wrapper"),
    Entry("igt_eval_params", **_VR, kind="function"),
    Entry(
        "storm",
        **_VR,
        kind="optimizer",
        battery=(
            Battery(
                "storm_approx",
                kwargs={"exact": False},
                adapt="rate_as_k",
                bad=(("w", 0.0), ("c", -1.0), ("k", 0.0)),
                sharded=True,
            ),
        ),
    ),
    Entry(
        "scale_by_storm",
        **_VR,
        kind="block",
        battery=(
            Battery(
                "storm_then_adam",
                kwargs={"exact": False},
                adapt="then_adam",
                bad=(("correction", 1.5),),
            ),
        ),
    ),
    Entry(
        "multi_momentum",
        **_VR,
        kind="block",
        battery=(
            Battery(
                "multi_momentum",
                0.01,
                {"num_clusters": 3},
                adapt="clusters",
                bad=(("decay", 1.0), ("nu", 2.0), ("weights", (1.0,))),
                sharded=True,
            ),
        ),
    ),
    # --- block-wise quantized state -------------------------------------------------------
    # min_size=0 in the battery: every state leaf is quantized, even the tiny ones
    Entry("adam_8bit", **_QUANT, baselines=(ADAM,)),  # adamw_8bit without weight decay
    Entry(
        "adamw_8bit",
        **_QUANT,
        baselines=(ADAMW,),
        battery=(
            Battery("adamw_8bit", kwargs={"min_size": 0}, bad=(("min_size", -1),), sharded=True),
        ),
    ),
    Entry(
        "lion_8bit",
        **_QUANT,
        rate_multiplier=1 / 3,
        baselines=(LION,),
        battery=(Battery("lion_8bit", 0.02, {"min_size": 0}, bad=(("b2", 1.5),), sharded=True),),
    ),
    Entry(
        "ademamix_8bit",
        **_QUANT,
        battery=(Battery("ademamix_8bit", kwargs={"b3": 0.999, "min_size": 0}),),
    ),
    Entry("adam_4bit", **_QUANT),
    Entry(
        "adamw_4bit",
        **_QUANT,
        baselines=(ADAMW,),
        battery=(
            Battery(
                "adamw_4bit",
                kwargs={"min_size": 0},
                bad=(("b2", 1.0), ("block_size", 0)),
                sharded=True,
            ),
        ),
    ),
    Entry("lion_4bit", **_QUANT, rate_multiplier=1 / 3),
    Entry("ademamix_4bit", **{**_QUANT, "tests": ("test_quantized_memory.py",)}),
    Entry(
        "quantize_state",
        **{**_QUANT, "module": "quantization", "kind": "wrapper"},
        battery=(
            Battery(
                "quantized_mars_then_rate",
                kwargs={"min_size": 0},
                adapt="rate",
                inner="mars",
                to_inner=True,
            ),
        ),
    ),
    # --- low-precision weights ------------------------------------------------------------
    Entry("stochastic_rounding", **_LOW, kind="block"),
    Entry("kahan_summation", **_LOW, kind="block"),
    Entry("split_mantissa", **_LOW, kind="block"),
    Entry("in_float32", **_LOW, kind="wrapper"),
    Entry("low_precision_weights", **_LOW, kind="wrapper"),
    Entry(
        "bf16_adamw",
        **_LOW,
        kind="optimizer",
        battery=(
            Battery("bf16_adamw", bad=(*ADAM_BAD, ("weight_decay", -1.0)), float32_updates=True),
        ),
    ),
    Entry("bf16_adamw_8bit", **_LOW, kind="optimizer"),
    # --- noise-aware scaling and clipping -------------------------------------------------
    Entry(
        "autoclip",
        **_NOISE,
        kind="block",
        family="noise-aware clipping",
        battery=(
            # a short window keeps the per-step sort cheap over Rosenbrock's 10k steps
            Battery(
                "autoclip_then_adam",
                kwargs={"window": 100},
                adapt="then_adam",
                bad=(("percentile", 0.0), ("window", 0)),
            ),
        ),
    ),
    Entry(
        "quantile_clipping",
        **_NOISE,
        kind="block",
        family="noise-aware clipping",
        battery=(
            # the estimate moves at most 10 a step, a lag that makes Adam at 0.1 overshoot
            Battery(
                "quantile_clipping_then_adam",
                0.02,
                {"threshold": 10.0},
                adapt="then_adam",
                bad=(("threshold", 0.0), ("scope", "layer"), ("quantile", 0.0)),
            ),
        ),
    ),
    Entry(
        "scale_by_gsnr",
        **_NOISE,
        kind="block",
        family="noise-aware scaling",
        battery=(
            Battery(
                "gsnr_then_adam",
                adapt="samples_then_adam",
                bad=(("min_scale", 0.0), ("min_scale", 2.0)),
            ),
        ),
    ),
    Entry(
        "agvm",
        **_NOISE,
        kind="wrapper",
        family="noise-aware scaling",
        battery=(
            Battery(
                "agvm_adam",
                kwargs={"anchor": "first", "interval": 2},
                adapt="samples_around_adam_two_groups",
                bad=(("momentum", 1.0), ("start_step", -1), ("min_ratio", 0.0)),
            ),
        ),
    ),
    # --- weight rescaling -----------------------------------------------------------------
    Entry(
        "target_variance_rescaling",
        **_RESCALE,
        kind="block",
        battery=(
            # the battery's matrices start with a spread of about 1: target 0.5 bites
            Battery(
                "adamw_then_tvr",
                kwargs={"target_std": 0.5, "every": 3},
                adapt="after_adamw",
                bad=(("target_std", 0.0), ("every", 0), ("ratio_threshold", 0.5)),
            ),
        ),
    ),
    Entry("layer_index_rescaling", **_RESCALE, kind="function"),
    # --- diagnostics ----------------------------------------------------------------------
    Entry(
        "gradient_noise_scale",
        **_DIAG,
        battery=(
            # the monitors pass the updates through and keep their readings in the state
            Battery(
                "monitors_then_adam",
                kwargs={"small_batch_size": 1, "large_batch_size": 2},
                adapt="monitors_then_adam",
                bad=(("decay", 1.0), ("small_batch_size", 0)),
            ),
        ),
    ),
    Entry("gradient_snr_monitor", **_DIAG),  # in the battery with gradient_noise_scale
    Entry("state_bytes", **{**_DIAG, "tests": ("test_precision.py", "test_quantization.py")}),
)

ENTRIES: dict[str, Entry] = {entry.name: entry for entry in REGISTRY}


def names(kind: str | None = None) -> tuple[str, ...]:
    """The entries' names, in registry order; only those of ``kind`` if given.

    Examples:
      >>> names("schedule")
      ('ademamix_alpha_schedule', 'ademamix_beta3_schedule')
    """
    return tuple(entry.name for entry in REGISTRY if kind is None or entry.kind == kind)
