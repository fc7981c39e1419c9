"""Polynomial arithmetic (sepify.cost.symbolic) against plain integer arithmetic: for any expression
built from symbols and ints with + and *, evaluating the Poly at some values equals computing
the expression with the values substituted."""

from hypothesis import given, settings
from hypothesis import strategies as st

from sepify.cost.symbolic import Poly, evaluate, formula, prod

SYMBOLS = ("batch", "h", "w")

# an expression: an int, a symbol name, or ("+"|"*", left, right)
_leaf = st.one_of(st.integers(-5, 5), st.sampled_from(SYMBOLS))
expressions = st.recursive(_leaf, lambda sub: st.tuples(st.sampled_from("+*"), sub, sub), max_leaves=12)


def _build(e):
    if isinstance(e, int):
        return e
    if isinstance(e, str):
        return Poly.symbol(e)
    op, a, b = e
    a, b = _build(a), _build(b)
    return a + b if op == "+" else a * b


def _value(e, values):
    if isinstance(e, int):
        return e
    if isinstance(e, str):
        return values[e]
    op, a, b = e
    a, b = _value(a, values), _value(b, values)
    return a + b if op == "+" else a * b


@settings(max_examples=300, deadline=None)
@given(expressions, st.fixed_dictionaries({s: st.integers(-4, 9) for s in SYMBOLS}))
def test_poly_evaluates_like_the_expression(e, values):
    p = _build(e)
    assert evaluate(p, values) == _value(e, values)
    if isinstance(p, Poly):
        assert all(c != 0 for c in p.terms.values())  # no zero coefficient is kept
        # the same polynomial however it was built: equal to its re-lifted copy
        assert p == Poly(dict(p.terms)) and hash(p) == hash(Poly(dict(p.terms)))


def test_formula_and_constant_cases():
    b = Poly.symbol("batch")
    assert formula(b * 4093640000, lambda n: f"{n / 1e9:.2f}G") == "4.09G·batch"
    assert formula(b * 2 + 3) == "2·batch + 3"
    assert formula(b * b * 3 + b) == "3·batch^2 + batch"
    assert formula((b + 1) * 0) is None  # a constant (zero) polynomial has no formula
    cancel = b * -1 + b + 7  # the batch terms cancel: a constant
    assert formula(cancel) is None and evaluate(cancel, {"batch": 5}) == 7 and cancel.terms == {(): 7}
    assert formula(prod([b, 2, 3])) == "6·batch"
    assert formula(12) is None
