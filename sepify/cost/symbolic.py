"""Polynomials in symbolic dimensions, so that costs of a model with a free ``batch`` (or
``height``...) dimension can be reported as a formula such as ``4.09G·batch``.

Cost rules multiply and add dimensions. A concrete dimension is a Python ``int``; a symbolic
one (an ONNX ``dim_param``) becomes :class:`Poly`. ``int`` op ``int`` stays ``int`` (the fast
path for the common, fully static case); anything touching a :class:`Poly` gives a
:class:`Poly`. Only ``+`` and ``*`` are supported: a cost that needs division or ``max`` of a
symbolic quantity is not polynomial and is computed numerically instead.
"""

from __future__ import annotations

import functools
from typing import Mapping, Union

Num = Union[int, "Poly"]
_Mono = tuple  # sorted tuple of (symbol, power)


def _mono_mul(a: _Mono, b: _Mono) -> _Mono:
    powers = dict(a)
    for sym, p in b:
        powers[sym] = powers.get(sym, 0) + p
    return tuple(sorted(powers.items()))


class Poly:
    """A polynomial with integer coefficients over named symbols."""

    __slots__ = ("terms",)

    def __init__(self, terms: Mapping[_Mono, int] | None = None):
        self.terms = {m: c for m, c in (terms or {}).items() if c != 0}

    @classmethod
    def _of(cls, terms: dict) -> "Poly":
        """A Poly owning ``terms``, which has no zero coefficient (the fast constructor)."""
        p = object.__new__(cls)
        p.terms = terms
        return p

    @classmethod
    def symbol(cls, name: str) -> "Poly":
        return cls({((name, 1),): 1})

    @staticmethod
    def lift(x: Num) -> "Poly":
        return x if isinstance(x, Poly) else Poly({(): int(x)})

    def __add__(self, other: Num) -> "Poly":
        terms = dict(self.terms)
        if other.__class__ is int:  # the common case: a constant
            if other:
                c = terms.get((), 0) + other
                if c:
                    terms[()] = c
                else:
                    del terms[()]
            return Poly._of(terms)
        for m, c in Poly.lift(other).terms.items():
            c += terms.get(m, 0)
            if c:
                terms[m] = c
            else:
                terms.pop(m, None)
        return Poly._of(terms)

    __radd__ = __add__

    def __mul__(self, other: Num) -> "Poly":
        if other.__class__ is int:  # the common case: a constant
            return Poly._of({m: c * other for m, c in self.terms.items()} if other else {})
        terms: dict = {}
        other_terms = Poly.lift(other).terms
        for m1, c1 in self.terms.items():
            for m2, c2 in other_terms.items():
                m = _mono_mul(m1, m2) if m1 and m2 else (m1 or m2)
                terms[m] = terms.get(m, 0) + c1 * c2
        return Poly({m: c for m, c in terms.items() if c})

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (int, Poly)):
            return Poly.lift(other).terms == self.terms
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.terms.items())))

    @property
    def symbols(self) -> set[str]:
        return {s for m in self.terms for s, _ in m}

    def has_symbols(self) -> bool:
        return any(self.terms)  # a non-constant monomial is a non-empty tuple

    def evaluate(self, values: Mapping[str, int]) -> int:
        total = 0
        for m, c in self.terms.items():
            v = c
            for s, p in m:
                v *= values.get(s, 1) ** p
            total += v
        return total

    def format(self, number_format=str) -> str:
        """Human form, highest degree first: ``4.09G·batch + 1.2M``."""
        return _format(frozenset(self.terms.items()), number_format)

    def __repr__(self) -> str:
        return f"Poly({self.format()})"


@functools.lru_cache(maxsize=65536)  # a model's layers repeat a few costs many times
def _format(terms: frozenset, number_format) -> str:
    if not terms:
        return "0"
    parts = []
    for m, c in sorted(terms, key=lambda t: (-sum(p for _, p in t[0]), t[0])):
        syms = "·".join(s if p == 1 else f"{s}^{p}" for s, p in m)
        if not syms:
            parts.append(number_format(c))
        elif c == 1:
            parts.append(syms)
        else:
            parts.append(f"{number_format(c)}·{syms}")
    return " + ".join(parts)


def add_terms(acc: dict, x: Num) -> None:
    """``acc += x`` in place, for a running sum kept as ``{monomial: coefficient}`` (adding
    Polys one at a time would copy the sum each time); ``Poly(acc)`` is the total."""
    if x.__class__ is int:
        acc[()] = acc.get((), 0) + x
    else:
        for m, c in x.terms.items():
            acc[m] = acc.get(m, 0) + c


def is_symbolic(x: object) -> bool:
    return isinstance(x, Poly) and x.has_symbols()


def evaluate(x: Num | None, values: Mapping[str, int]) -> int | None:
    if x is None:
        return None
    return x.evaluate(values) if isinstance(x, Poly) else int(x)


def prod(values) -> Num:
    out: Num = 1
    for v in values:
        out = out * v
    return out


def formula(x: Num | None, number_format=str) -> str | None:
    """The formula string of a symbolic value, ``None`` for a concrete one."""
    if isinstance(x, Poly) and x.has_symbols():
        return x.format(number_format)
    return None
