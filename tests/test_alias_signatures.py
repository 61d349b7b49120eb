"""The quantized and MARS aliases of varjax/alias.py write their signatures out (so
that griffe, type checkers and IDEs read them); these checks keep each one equal to
what its body passes on, so that the written copies cannot drift apart."""

from __future__ import annotations

import inspect

import pytest

import varjax
from varjax import alias

# name -> (full-precision alias, the arguments it fixes)
QUANTIZED = {
    "adam_8bit": (alias._adamw, {"weight_decay", "mask"}),
    "adam_4bit": (alias._adamw, {"weight_decay", "mask"}),
    "adamw_8bit": (alias._adamw, set()),
    "adamw_4bit": (alias._adamw, set()),
    "lion_8bit": (alias._lion, set()),
    "lion_4bit": (alias._lion, set()),
    "ademamix_8bit": (varjax.ademamix, set()),
    "ademamix_4bit": (varjax.ademamix, set()),
}
MARS = {"mars_adamw": {"preconditioner"}, "mars_lion": {"preconditioner", "amsgrad"}}
MARS["mars_shampoo"] = MARS["mars_lion"]


def _parameters(function, leave_out=()) -> list[tuple[str, object, object, object]]:
    return [
        (p.name, p.kind, p.default, p.annotation)
        for p in inspect.signature(function).parameters.values()
        if p.name not in leave_out
    ]


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_quantized_alias_takes_its_full_alias_arguments_then_the_quantizer_options(name):
    full, fixed = QUANTIZED[name]
    quantized = getattr(varjax, name)
    options = [
        (p.name, inspect.Parameter.KEYWORD_ONLY, p.default, p.annotation)
        for p in inspect.signature(varjax.quantize_state).parameters.values()
        if p.name in alias._QUANTIZATION_OPTIONS
    ]
    own = _parameters(quantized)
    assert own[: -len(options)] == _parameters(full, fixed)
    assert sorted(own[-len(options) :]) == sorted(
        (n, k, d, a if n != "roles" else "RoleOverride") for n, k, d, a in options
    )
    assert quantized.__name__ == name and quantized.__module__ == "varjax.alias"


@pytest.mark.parametrize("name", sorted(MARS))
def test_mars_alias_takes_the_arguments_of_mars_less_what_it_fixes(name):
    body = [(n, kind, a) for n, kind, _, a in _parameters(alias._mars, MARS[name])]
    own = _parameters(getattr(varjax, name))
    assert [n for n, *_ in own] == [n for n, *_ in body]
    assert [a for *_, a in own] == [a for *_, a in body]
    # the three share their defaults (the official ones)
    assert [p for p in own if p[0] != "amsgrad"] == _parameters(varjax.mars_adamw, {"amsgrad"})
