"""Range checks for the model config dataclasses, called from their ``__post_init__``.

Every failure is a ``ValueError`` with one message format, naming the field both as the
dataclass field and as its command-line flag::

    n_head (--n-head) must divide n_embd (--n-embd) = 128, got 3
"""
import math
import numbers
from typing import Iterable


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field(name: str) -> str:
    """``name (--name)``: how a message refers to a field."""
    return f"{name} ({flag(name)})"


def fail(name: str, requirement: str, value) -> None:
    raise ValueError(f"{field(name)} must {requirement}, got {value!r}")


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(cfg, name: str, lo: int = 1, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if not is_int(v) or v < lo:
        fail(name, ("be None or " if optional else "be ") + f"an int >= {lo}", v)


def check_real(cfg, name: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = True) -> None:
    """A finite real number (not a bool) in the interval from lo to hi (open or closed ends)."""
    v = getattr(cfg, name)
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        if hi == math.inf:
            fail(name, f"be a finite number {'>' if lo_open else '>='} {lo:g}", v)
        fail(name, f"be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}", v)


def check_bool(cfg, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, bool):
        fail(name, "be True or False", v)


def check_choice(cfg, name: str, choices: Iterable[str]) -> None:
    v = getattr(cfg, name)
    choices = tuple(choices)
    if not isinstance(v, str) or v not in choices:
        fail(name, f"be one of {', '.join(choices)}", v)


def check_divides(cfg, name: str, width: str) -> None:
    """Field ``name`` (a head count) divides field ``width``; both already checked as ints >= 1."""
    v, w = getattr(cfg, name), getattr(cfg, width)
    if w % v:
        fail(name, f"divide {field(width)} = {w}", v)


def check_hidden_width(cfg, ratio: str, width: str) -> None:
    """int(ratio * width) >= 1: the MLP's hidden layer is not empty."""
    r, w = getattr(cfg, ratio), getattr(cfg, width)
    if int(r * w) < 1:
        fail(ratio, f"be >= 1 / {field(width)} = {1 / w:g} (an MLP hidden width >= 1)", r)


def check_distances(cfg) -> None:
    """LEAP distances: 1 <= min_distance <= max_distance, gen_distance in between."""
    for n in ("min_distance", "max_distance", "gen_distance"):
        check_int(cfg, n, 1)
    if cfg.min_distance > cfg.max_distance:
        fail("min_distance", f"be <= {field('max_distance')} = {cfg.max_distance}", cfg.min_distance)
    if not cfg.min_distance <= cfg.gen_distance <= cfg.max_distance:
        fail("gen_distance", f"be in [{field('min_distance')}, {field('max_distance')}] = "
             f"[{cfg.min_distance}, {cfg.max_distance}]", cfg.gen_distance)
