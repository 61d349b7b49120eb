"""The roles of Optax's state types, in one table (see [`varjax.roles`][]).

Each row names a state type by its module and class, and gives the role of each field. Rows whose
type the installed Optax lacks (an older or newer release) are skipped;
[`REGISTERED`][varjax.quantization.optax_roles.REGISTERED] lists those that were found.

Choices worth knowing:

- Running sums and estimates that set the step size itself (D-Adaptation's and
  Prodigy's ``grad_sum``, ``estim_lr``, ``numerator_weighted``; DoG's distances;
  Mechanic's scale statistics) are kept exact: their error does not average out
  over steps as a moment's does.
- Gradients kept to be differenced with the next one (Adan's ``g``, the optimistic
  gradient's ``previous_gradient``) and accumulated micro-batch gradients
  (``MultiSteps``' ``acc_grads``) are kept exact: 8-bit rounding of either would
  be a gradient error of about 1% of a block's largest value at every step.
- Centered RMSProp's ``mu`` and ``nu`` are kept exact: it divides by
  ``sqrt(nu - mu**2)``, and rounded independently the two can cross, which turned
  the step NaN within 200 steps of an 8-bit run.
- COCOB's ``cumulative_gradients`` is a signed sum and its ``scale``,
  ``subgradients`` and ``reward`` are non-negative (a running maximum of ``|g|``,
  a sum of ``|g|``, and a reward clipped at zero).

Examples:
  >>> import optax
  >>> from varjax.roles import declared_roles
  >>> {field: role.name for field, role in declared_roles(optax.FactoredState).items()}
  {'count': 'COUNT', 'v_row': 'NON_NEGATIVE', 'v_col': 'NON_NEGATIVE', 'v': 'NON_NEGATIVE'}
"""

from __future__ import annotations

import importlib

from varjax.roles import Role, register_roles

__all__ = ["REGISTERED", "TABLE"]

S, N, P, E, C, I = (  # noqa: E741
    Role.SIGNED,
    Role.NON_NEGATIVE,
    Role.PARAMETERS,
    Role.EXACT,
    Role.COUNT,
    Role.NESTED,
)

TABLE: dict[str, dict[str, Role]] = {
    # optax._src.transform: Adam and kin, RMS, Lion, Adan, SM3, ...
    "optax._src.transform.ScaleByAdamState": dict(count=C, mu=S, nu=N),
    "optax._src.transform.ScaleByAmsgradState": dict(count=C, mu=S, nu=N, nu_max=N),
    "optax._src.transform.ScaleByLionState": dict(count=C, mu=S),
    "optax._src.transform.ScaleByRssState": dict(sum_of_squares=N),
    "optax._src.transform.ScaleByRmsState": dict(nu=N),
    "optax._src.transform.ScaleByRmsWithCountState": dict(count=C, nu=N),
    # centered RMSProp divides by sqrt(nu - mu**2), a difference of two close numbers:
    # quantized apart, mu**2 can pass nu and the step turns NaN (seen in 200 steps)
    "optax._src.transform.ScaleByRStdDevState": dict(mu=E, nu=E),
    "optax._src.transform.ScaleByRStdDevWithCountState": dict(count=C, mu=E, nu=E),
    "optax._src.transform.ScaleByBeliefState": dict(count=C, mu=S, nu=N),
    "optax._src.transform.ScaleByAdaDeltaState": dict(e_g=N, e_x=N),
    "optax._src.transform.ScaleByAdanState": dict(m=S, v=S, n=N, g=E, t=C),
    "optax._src.transform.ScaleBySM3State": dict(mu=N, nu=S),
    "optax._src.transform.ScaleByNovogradState": dict(count=C, mu=S, nu=N),
    "optax._src.transform.ScaleByScheduleState": dict(count=C),
    "optax._src.transform.ScaleByRpropState": dict(step_sizes=E, prev_updates=E),
    "optax._src.transform.ScaleByOptimisticGradientState": dict(
        is_initial_step=E, previous_gradient=E
    ),
    "optax._src.transform.ScaleByDistanceOverGradientsState": dict(
        max_dist=E, grad_sum_of_squares=E, init_params=P
    ),
    "optax._src.transform.ScaleByLBFGSState": dict(
        count=C,
        params=P,
        updates=E,
        diff_params_memory=E,
        diff_updates_memory=E,
        weights_memory=E,
    ),
    "optax._src.factorized.FactoredState": dict(count=C, v_row=N, v_col=N, v=N),
    "optax._src.base.EmptyState": {},
    "optax._src.lookahead.LookaheadState": dict(fast_state=I, steps_since_sync=C),
    # optax.transforms: accumulation, wrappers and combinators
    "optax.transforms._accumulation.TraceState": dict(trace=S),
    "optax.transforms._accumulation.EmaState": dict(count=C, ema=S),
    "optax.transforms._accumulation.MultiStepsState": dict(
        mini_step=C, gradient_step=C, inner_opt_state=I, acc_grads=E, skip_state=E
    ),
    "optax.transforms._adding.AddNoiseState": dict(count=C, rng_key=E),
    "optax.transforms._combining.PartitionState": dict(inner_states=I),
    "optax.transforms._conditionality.ApplyIfFiniteState": dict(
        notfinite_count=C, last_finite=E, total_notfinite=C, inner_state=I
    ),
    "optax.transforms._conditionality.ConditionallyMaskState": dict(step=C, inner_state=I),
    "optax.transforms._conditionality.ConditionallyTransformState": dict(inner_state=I, step=C),
    "optax.transforms._constraining.ZeroNansState": dict(found_nan=E),
    "optax.transforms._masking.MaskedState": dict(inner_state=I),
    "optax.transforms._monitoring.MonitorState": dict(measurements=E, measure_states=E),
    "optax.transforms._monitoring.SnapshotState": dict(measurement=E),
    "optax.schedules._inject.InjectHyperparamsState": dict(count=C, hyperparams=E, inner_state=I),
    "optax.schedules._inject.InjectStatefulHyperparamsState": dict(
        count=C, hyperparams=E, hyperparams_states=E, inner_state=I
    ),
    "optax.schedules._inject.WrappedScheduleState": dict(count=C),
    # optax.contrib
    "optax.contrib._ademamix.ScaleByAdemamixState": dict(count=C, count_m2=C, m1=S, m2=S, nu=N),
    "optax.contrib._ademamix.ScaleBySimplifiedAdEMAMixState": dict(t=C, m=S, n=N),
    "optax.contrib._cocob.COCOBState": dict(
        init_particles=P, cumulative_gradients=S, scale=N, subgradients=N, reward=N
    ),
    "optax.contrib._complex_valued.SplitRealAndImaginaryState": dict(inner_state=I),
    "optax.contrib._dadapt_adamw.DAdaptAdamWState": dict(
        exp_avg=S, exp_avg_sq=N, grad_sum=E, estim_lr=E, numerator_weighted=E, count=C
    ),
    "optax.contrib._dog.DoGState": dict(
        is_init_step=E, init_params=P, max_dist=E, sum_sq_norm_grads=E
    ),
    "optax.contrib._dog.DoWGState": dict(init_params=P, weighted_sq_norm_grads=E, estim_sq_dist=E),
    "optax.contrib._galore.GaLoreState": dict(count=C, base_optimizer_state=I, projector=E),
    "optax.contrib._madgrad.MadgradState": dict(count=C, grad_sum_sq=N, s=S, x0=P),
    "optax.contrib._mechanic.MechanicState": dict(
        base_optimizer_state=I, count=C, r=E, m=E, v=E, s=E, x0=P
    ),
    "optax.contrib._momo.MomoAdamState": dict(
        exp_avg=S, exp_avg_sq=N, barf=E, gamma=E, lb=E, count=C
    ),
    "optax.contrib._momo.MomoState": dict(exp_avg=S, barf=E, gamma=E, lb=E, count=C),
    "optax.contrib._muon.MuonState": dict(count=C, mu=S, ns_coeffs=E),
    "optax.contrib._privacy.DifferentiallyPrivateAggregateState": dict(rng_key=E),
    "optax.contrib._prodigy.ProdigyState": dict(
        exp_avg=S,
        exp_avg_sq=N,
        grad_sum=E,
        params0=P,
        estim_lr=E,
        numerator_weighted=E,
        count=C,
    ),
    "optax.contrib._reduce_on_plateau.ReduceLROnPlateauState": dict(
        scale=E, best_value=E, plateau_count=C, cooldown_count=C, count=C, avg_value=E
    ),
    "optax.contrib._sam.SAMState": dict(steps_since_sync=C, opt_state=I, adv_state=I, cache=E),
    "optax.contrib._schedule_free.ScheduleFreeState": dict(
        b1=E, weight_sum=E, step_count=C, max_lr=E, base_optimizer_state=I, z=P
    ),
    "optax.contrib._sophia.SophiaState": dict(count=C, mu=S, nu=N, hessian_fn_state=I),
    "optax.contrib._sophia.HutchinsonState": dict(key=E),
}


def _resolve(dotted: str) -> type | None:
    module_name, _, name = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, name, None)


def _register_table() -> tuple[type, ...]:
    found = []
    for dotted, roles in TABLE.items():
        cls = _resolve(dotted)
        if cls is not None:
            register_roles(cls, **roles)
            found.append(cls)
    return tuple(found)


REGISTERED: tuple[type, ...] = _register_table()
"""The Optax state types of [`TABLE`][varjax.quantization.optax_roles.TABLE] that the installed
Optax defines."""
