"""argparse value types shared by the subcommands: a bad number is refused while the command
line is parsed, before any model loads, with argparse's ``error: argument --flag: …`` line
and exit code 2 — the message names the flag, the value given and the range expected.
"""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

from .tiling import check_tiling
from .uncertainty import PSI_MAX_LIMIT

__all__ = ["UsageError", "OneLineParser", "int_min", "float_range", "off_or", "int_list", "writable_file",
           "png_or_folder", "check_tiling_flags", "B_U_ARG", "PSI_MAX_ARG"]


def check_tiling_flags(tile: int, overlap: int, multiple: int) -> None:
    """:func:`~upsr_core.tiling.check_tiling` for ``--tile``/``--overlap`` once the nets' multiple
    is known (after parsing): its ValueError names the two flags and their values."""
    try:
        check_tiling(tile, overlap, multiple)
    except ValueError as e:  # its words are the library's
        raise ValueError(f"--tile {tile} / --overlap {overlap}: {e}") from None


def int_min(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer >= ``lo`` (and <= ``hi`` if given)."""
    want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {want}, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {v}")
        return v

    parse.__name__ = f"integer {want}"
    return parse


SEED_ARG = int_min(0, 2**63 - 1)
"""--seed: every file of a run gets this seed (the library takes up to 2**63 − batch)."""


def float_range(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in [lo, hi] (an end excluded where ``lo_open`` / ``hi_open``)."""
    if hi == math.inf:
        expected = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        expected = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {expected.removeprefix('a finite number ')}, "
                                             f"got {s!r}") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {s}")
        return v

    parse.__name__ = f"number {expected}"
    return parse


def off_or(parse_value: Callable[[str], float]) -> Callable[[str], float | str]:
    """The word ``off``, or a value ``parse_value`` accepts (its message names both)."""
    def parse(s: str) -> float | str:
        if s.strip().lower() == "off":
            return "off"
        try:
            return parse_value(s)
        except argparse.ArgumentTypeError as e:
            head, sep, got = str(e).rpartition(", got ")
            raise argparse.ArgumentTypeError(f"{head} (or off){sep}{got}" if sep else f"{e} (or off)") from None

    parse.__name__ = f"off or {parse_value.__name__}"
    return parse


def int_list(lo: int) -> Callable[[str], list[int]]:
    """A comma list of at least one integer, each >= ``lo`` (``64,128,256``)."""
    one = int_min(lo)

    def parse(s: str) -> list[int]:
        vals = [one(v.strip()) for v in s.split(",") if v.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers >= {lo}, got {s!r}")
        return vals

    parse.__name__ = f"comma list of integers >= {lo}"
    return parse


def writable_file(suffix: str | tuple[str, ...] | None = None, *, exact: bool = False) -> Callable[[str], str]:
    """A path to write one file to: not an existing folder, not ending in a separator and,
    if ``suffix`` is given, ending in it (or one of them; case-insensitive unless ``exact``).
    Its folder is made on writing."""
    ends = (suffix,) if isinstance(suffix, str) else suffix
    want = " or ".join(ends) if ends else ""

    def parse(s: str) -> str:
        if s.endswith(("/", "\\")) or Path(s).is_dir():
            raise argparse.ArgumentTypeError(f"{s!r} is a folder; expected a file path"
                                             + (f" ending in {want}" if ends else ""))
        if ends is not None and not (s if exact else s.lower()).endswith(ends):
            raise argparse.ArgumentTypeError(f"{s!r} must end in {want}")
        return s

    parse.__name__ = "file path"
    return parse


def png_or_folder(s: str) -> str:
    """``upscale -o``: a .png file, or a folder (an existing one, a name without a suffix or
    one ending in a separator); ``upscale`` writes PNG only, so .jpg/.webp/… are refused."""
    p = Path(s)
    if not s.strip():
        raise argparse.ArgumentTypeError("is empty; expected a .png file or a folder")
    if not (s.endswith(("/", "\\")) or p.is_dir()) and p.suffix and p.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{s!r}: upscale writes PNG only (lossless, 8 or 16 bits, streamed for "
                                         "large images); name the output .png, or a folder (a folder whose name "
                                         "has a dot: end it with /)")
    return s


png_or_folder.__name__ = "PNG file or folder"


B_U_ARG = float_range(0.0, 1.0)
"""--b-u: the noise floor, in [0, 1]."""
PSI_MAX_ARG = float_range(0.0, PSI_MAX_LIMIT, lo_open=True)
"""--psi-max: in (0, 0.5], the range of a computed ψ (as UPSR Upscale ×4's slider; Weight Noise's
goes to 1 for painted masks, which the CLI does not take)."""


class UsageError(Exception):
    """A command line argparse refused (unknown flag, missing argument, value out of range)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that keeps the one-line ``error: …`` contract: its complaints (which name the
    flag, the value and the range) become a UsageError, printed by the command's ``main`` with exit code 2,
    instead of usage text and a SystemExit. Subcommand parsers inherit the class."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse's own pattern has no exponent, so "--lr -1e-4" read -1e-4 as a flag ("expected one
        # argument") instead of a value for the range check to name
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")
