"""Polynomials in symbolic dimensions, so that costs of a model with a free ``batch`` (or
``height``...) dimension can be reported as a formula such as ``4.09G·batch``.

Cost rules multiply and add dimensions. A concrete dimension is a Python ``int``; a symbolic
one (an ONNX ``dim_param``) becomes :class:`Poly`. ``int`` op ``int`` stays ``int`` (the fast
path for the common, fully static case); anything touching a :class:`Poly` gives a
:class:`Poly`. Rules use only ``+`` and ``*``; a cost that needs ``max`` of a symbolic quantity
is not polynomial and is computed numerically instead.

**Derived dimensions.** A strided Conv or a pool maps a symbolic height ``H`` to
``floor((H + pads - dilation·(k-1) - 1) / stride) + 1``, which is not a polynomial in ``H``. Such
a quotient is a symbol of its own, an *atom* ``floor(n / d)`` with ``n`` a polynomial and ``d``
a positive integer (:func:`floordiv`), so that costs stay polynomials over the input symbols and
these atoms, and stay exact. Atoms are kept in a canonical form, using (for integers ``x``,
integers ``c`` and positive ``d``, ``e``):

- ``floor(x/d) + c == floor((x + c·d)/d)``: the constant of ``n`` is reduced to ``0 <= r < d``
  and the rest is added outside, so ``floor((H-1)/2) + 1`` (3x3, stride 2, pad 1) is
  ``floor((H+1)/2)``, written ``⌈H/2⌉``;
- ``floor((floor(x/d) + c)/e) == floor((x + c·d)/(d·e))``: nested quotients collapse, so a
  stride-2 pool after a stride-2 conv gives ``⌈H/4⌉``, not ``⌈⌈H/2⌉/2⌉``;
- ``floor((g·y + c)/d) == floor((y + floor(c/g))/(d/g))`` when ``g`` divides ``d`` and every
  non-constant coefficient of ``n``: common factors cancel (and ``d = 1`` is no quotient);
- ``floor((d·q + x)/d) == q + floor(x/d)``: terms whose coefficient ``d`` divides come out;
- ``floor(-y/d) == -floor((y + d - 1)/d)``: a numerator with only negative terms is turned
  around, so ``H mod 7 = H - 7·⌊H/7⌋`` and Swin's pad ``(7 - H mod 7) mod 7`` give the padded
  size ``7·⌈H/7⌉``.

An atom's name is its formula (``⌈H/2⌉``, ``⌊H/4⌋``, ``⌊(H+2)/4⌋``); a dimension that is a
polynomial over atoms (``2·⌈H/32⌉`` after an upsampling) is named by its formula too
(:func:`dim_name`), and :func:`dim_poly` reads such a name back. Evaluating an atom evaluates its
numerator first, so ``⌈H/2⌉`` at ``H = 1`` is 1, exactly what shape inference gives at that size.
"""

from __future__ import annotations

import functools
import math
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

    def __neg__(self) -> "Poly":
        return Poly._of({m: -c for m, c in self.terms.items()})

    def __sub__(self, other: Num) -> "Poly":
        return self + (-other)

    def __rsub__(self, other: Num) -> "Poly":
        return (-self) + other

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
        """The input symbols the value depends on (through atoms too)."""
        out: set[str] = set()
        for m in self.terms:
            for s, _ in m:
                out |= base_symbols(s)
        return out

    def has_symbols(self) -> bool:
        return any(self.terms)  # a non-constant monomial is a non-empty tuple

    def evaluate(self, values: Mapping[str, int]) -> int:
        total = 0
        for m, c in self.terms.items():
            v = c
            for s, p in m:
                atom = _ATOMS.get(s)
                if atom is None:
                    v *= values.get(s, 1) ** p
                else:
                    v *= (atom[0].evaluate(values) // atom[1]) ** p
            total += v
        return total

    def format(self, number_format=str) -> str:
        """Human form, highest degree first, then largest coefficient: ``4.09G·batch + 1.2M``."""
        return _format(frozenset(self.terms.items()), number_format)

    def __repr__(self) -> str:
        return f"Poly({self.format()})"


@functools.lru_cache(maxsize=65536)  # a model's layers repeat a few costs many times
def _format(terms: frozenset, number_format) -> str:
    if not terms:
        return "0"
    out = ""
    for m, c in sorted(terms, key=lambda t: (-sum(p for _, p in t[0]), -abs(t[1]), t[0])):
        syms = "·".join(s if p == 1 else f"{s}^{p}" for s, p in m)
        a = abs(c)
        if not syms:
            part = number_format(a)
        elif a == 1:
            part = syms
        else:
            part = f"{number_format(a)}·{syms}"
        if not out:
            out = part if c > 0 else "-" + part
        else:
            out += (" + " if c > 0 else " - ") + part
    return out


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


# -- derived dimensions (see the module docstring) ---------------------------------------------

_ATOMS: dict[str, tuple[Poly, int]] = {}  # atom name -> (numerator, divisor)
_DIMS: dict[str, Poly] = {}  # dimension name (a formula) -> its polynomial


def base_symbols(name: str) -> set[str]:
    """The input symbols a symbol stands for: itself, or an atom's numerator's symbols."""
    atom = _ATOMS.get(name)
    return {name} if atom is None else atom[0].symbols


def is_atom(name: str) -> bool:
    return name in _ATOMS


def floordiv(n: Num, d: int) -> Num:
    """``floor(n / d)`` for a positive integer ``d``, exact: an ``int`` for a constant ``n``,
    else a :class:`Poly` over a canonical atom (see the module docstring)."""
    d = int(d)
    if d <= 0:
        raise ValueError("divisor must be positive")
    if n.__class__ is int:
        return n // d
    if not n.has_symbols():
        return n.evaluate({}) // d
    c = n.terms.get((), 0)
    var = {m: k for m, k in n.terms.items() if m}
    # integer multiples of d come out: floor((d·q + x)/d) == q + floor(x/d)
    whole = {m: k // d for m, k in var.items() if k % d == 0}
    if whole:
        rest = Poly._of({m: k for m, k in var.items() if k % d}) + c
        return Poly._of(whole) + floordiv(rest, d)
    # a negative numerator: floor(-y/d) == -ceil(y/d) == -floor((y + d - 1)/d)
    if all(k < 0 for k in var.values()):
        return -floordiv(-n + (d - 1), d)
    # a nested quotient: floor((floor(x/e) + c)/d) == floor((x + c·e)/(e·d))
    if len(var) == 1:
        (m, k), = var.items()
        if k == 1 and len(m) == 1 and m[0][1] == 1 and m[0][0] in _ATOMS:
            inner, e = _ATOMS[m[0][0]]
            return floordiv(inner + c * e, e * d)
    g = math.gcd(d, *var.values())
    if g > 1:  # floor((g·y + c)/d) == floor((y + floor(c/g))/(d/g))
        var = {m: k // g for m, k in var.items()}
        c, d = c // g, d // g
    q, r = divmod(c, d)  # floor(x/d) + q == floor((x + q·d)/d)
    if d == 1:
        return Poly._of(dict(var)) + q
    num = Poly._of(dict(var)) + r
    name = _atom_name(num, var, r, d)
    _ATOMS.setdefault(name, (num, d))
    return Poly.symbol(name) + q


def _compact(p: Poly) -> str:
    return p.format().replace(" + ", "+").replace(" - ", "-")


def _atom_name(num: Poly, var: dict, r: int, d: int) -> str:
    body = _compact(Poly._of(dict(var)))
    simple = len(var) == 1 and next(iter(var.values())) == 1 and len(next(iter(var))) == 1
    if r == 0:
        return f"⌊{body}/{d}⌋" if simple else f"⌊({body})/{d}⌋"
    if r == d - 1:
        return f"⌈{body}/{d}⌉" if simple else f"⌈({body})/{d}⌉"
    return f"⌊({_compact(num)})/{d}⌋"


def dim_name(x: Num) -> int | str:
    """A dimension as ONNX writes it: an ``int``, or a name (a ``dim_param``): an input symbol's
    own name, or the formula of a derived dimension (remembered, for :func:`dim_poly`)."""
    if x.__class__ is int:
        return x
    if not x.has_symbols():
        return x.evaluate({})
    name = _compact(x)
    _DIMS.setdefault(name, x)
    return name


def dim_poly(name: str) -> Poly | None:
    """The polynomial of a derived dimension's name (:func:`dim_name`), ``None`` if it is not one."""
    return _DIMS.get(name)
