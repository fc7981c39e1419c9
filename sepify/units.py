"""Human numbers: ``600M``, ``4.5M``, ``8MiB``, ``1.2G``, ``2%`` in; ``568.7M`` out."""

from __future__ import annotations

import functools
import math
import re

from .errors import UsageError

_SI = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_BIN = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_NUM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGTP]i?)?\s*([bB])?\s*$", re.ASCII)
#: the largest dimension an ONNX shape can hold (dims are int64)
MAX_DIM = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def positive_int(text) -> int | None:
    """``text`` (ASCII digits, surrounding blanks allowed) as an integer in [1, MAX_DIM], else
    None: ``"²"`` and ``"١٢"`` are digits to :meth:`str.isdigit` but not dimensions, and an ONNX
    dimension is an int64."""
    s = str(text).strip()
    if not _DIGITS.fullmatch(s):
        return None
    v = int(s)
    return v if 1 <= v <= MAX_DIM else None


def parse_quantity(text: str | int | float, what: str = "value") -> int:
    """Parse ``600M``, ``4.5M``, ``8MiB``, ``20MB``, ``1.2G``, ``1e9`` into an integer.

    SI suffixes are powers of 10, ``Ki``/``Mi``/``Gi``/``Ti`` powers of 2; a trailing ``B``
    (bytes) is allowed and ignored.
    """
    if isinstance(text, bool):
        raise UsageError(f"invalid {what}: {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise UsageError(f"invalid {what}: {text!r} (must be a finite number)")
        if text < 0:
            raise UsageError(f"invalid {what}: {text!r} (must be >= 0)")
        return int(round(text))
    m = _NUM.match(str(text))
    if not m:
        raise UsageError(f"invalid {what}: {text!r} (expected a number with an optional suffix such as 600M, 4.5M, 8MiB)")
    number, suffix, _ = m.groups()
    suffix = suffix or ""
    scale = _BIN[suffix] if suffix.endswith("i") else _SI[suffix]
    value = float(number) * scale
    if not math.isfinite(value):
        raise UsageError(f"invalid {what}: {text!r} (too large)")
    return int(round(value))


def parse_fraction(text: str | float, what: str = "value") -> float:
    """Parse ``2%`` or ``0.02`` into ``0.02``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise UsageError(f"invalid {what}: {text!r} (expected a fraction like 0.02 or a percentage like 2%)")
        return float(text)
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # (float() reads "nan" and "inf")
        raise UsageError(f"invalid {what}: {text!r} (expected a fraction like 0.02 or a percentage like 2%)") from None
    return value


#: output units, largest first (a --input-shape of 1x3x99999x99999 reaches petaMACs)
_SI_UNITS = (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))


@functools.lru_cache(maxsize=8192)  # a large model's table repeats a few values many times
def human(n: int | float | None, digits: int = 1) -> str:
    """``568740352`` → ``568.7M``; SI steps of 1000 with ``digits`` decimals (the one number
    format of every command; see docs/conventions.md). ``None`` → ``?``. A value that rounds
    to 1000 of a unit is shown in the next one (``999,990,000`` → ``1.0G``, not ``1000.0M``)."""
    if n is None:
        return "?"
    return _scaled(n, digits, _SI_UNITS, 1000, "")


@functools.lru_cache(maxsize=8192)
def human_bytes(n: int | float | None, digits: int = 1, style: str = "binary") -> str:
    """Bytes in binary units: ``8388608`` → ``8.0MiB``; ``style="si"``: decimal units, as a
    budget written ``20MB`` is shown (``20000000`` → ``20.0MB``)."""
    if n is None:
        return "?"
    if style == "si":
        return _scaled(n, digits, (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)),
                       1000, "B", whole=True)
    return _scaled(n, digits, (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20),
                               ("KiB", 2**10)), 1024, "B", whole=True)


def _scaled(n, digits: int, units, step: int, small: str, whole: bool = False) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for i, (unit, scale) in enumerate(units):
        if n >= scale or (i + 1 < len(units) and round(n / units[i + 1][1], digits) >= step):
            v = n / scale
            if round(v, digits) >= step and i > 0:  # 1023.96KiB rounds to 1024.0KiB: one unit up
                unit, v = units[i - 1][0], n / units[i - 1][1]
            return f"{sign}{v:.{digits}f}{unit}"
    if whole:
        return f"{sign}{int(n)}{small}"
    return f"{sign}{n:g}" if isinstance(n, float) else f"{sign}{n}"


def byte_style(text) -> str:
    """How a byte budget was written: ``"si"`` for a decimal suffix (``20MB``, ``5M``), else
    ``"binary"`` (``8MiB``, a plain number): values are shown in the same kind of unit."""
    if isinstance(text, str):
        m = _NUM.match(text)
        if m and m.group(2) and not m.group(2).endswith("i"):
            return "si"
    return "binary"


def human3(n: int | float | None) -> str:
    """Three significant digits: ``4093640000`` → ``4.09G``, ``568740352`` → ``569M``."""
    if n is None:
        return "?"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (*_SI_UNITS, ("", 1)):
        if n >= scale:
            v = n / scale
            s = f"{v:.{max(0, 2 - len(str(int(v))) + 1)}f}" if unit else str(int(n))
            return f"{sign}{s}{unit}"
    return f"{sign}{n:g}"


_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(.*?)\s*$")


def parse_shape(text: str, what: str, shown: str | None = None) -> list[int]:
    """``1x3x640x640`` (or ``1,3,640,640``) → ``[1, 3, 640, 640]``. Every dimension is a
    positive integer: a symbolic dimension is bound by name (``--dim`` / ``dims``), never
    spelled inside a shape, so a typo (``1x3xax224``) is an error, not a new symbol."""
    shown = text if shown is None else shown
    dims = [d.strip() for d in re.split(r"[x,]", text.strip())] if text.strip() else [""]
    for d in dims:
        if not d:
            raise UsageError(f"invalid {what} {shown!r}: empty dimension (expected like 1x3x224x224)")
        if positive_int(d) is None:
            raise UsageError(f"invalid {what} {shown!r}: {d!r} is not a positive integer{_too_large(d)} "
                             "(a symbolic dimension is bound by name: --dim NAME=VALUE, or dims in the config)")
    return [int(d) for d in dims]


def _too_large(d: str) -> str:
    return " below 2**63 (ONNX dimensions are int64)" if _DIGITS.fullmatch(d.strip()) and int(d) > MAX_DIM else ""


def parse_input_shape(text: str, what: str = "--input-shape") -> tuple[str, list[int]]:
    """``images=1x3x640x640`` → ``("images", [1, 3, 640, 640])`` (see :func:`parse_shape`)."""
    m = _SHAPE_RE.match(text)
    if not m or not m.group(2):
        raise UsageError(f"invalid {what} {text!r} (expected NAME=1x3x224x224)")
    return m.group(1), parse_shape(m.group(2), what, shown=text)


def parse_dim(text: str) -> tuple[str, int]:
    """``batch=8`` → ``("batch", 8)``."""
    name, sep, value = text.partition("=")
    v = positive_int(value) if sep else None
    if not name.strip() or v is None:
        raise UsageError(f"invalid --dim {text!r} (expected SYMBOL=POSITIVE_INTEGER{_too_large(value).replace(' (', ': ').rstrip(')')})")
    return name.strip(), v
