"""Byte sizes as operators write them in configuration: `16M`, `1G`, `4096`.

Sizes are binary (`K` = 2^10, `M` = 2^20, `G` = 2^30) because that is what Accumulo's
configuration means by them, and an operator porting a configuration should get the same limits.
A bare number is bytes. Parsing is strict (whole numbers only, no other suffixes) so that a typo
such as `16MB` or `1.5G` is reported instead of being silently read as something else.
"""

from __future__ import annotations

import re

from lithify.errors import ConfigError

_MULTIPLIERS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE_RE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)


def parse_size(text: str, *, property_name: str) -> int:
    """Parse `text` as a byte count; raise ConfigError naming `property_name` when it is not one.

    Surrounding whitespace is ignored and suffixes are case-insensitive (`16m` == `16M`).
    """
    if not isinstance(text, str):
        raise ConfigError(f"{property_name}: expected a size such as '16M' or '4096', got {text!r}")
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"{property_name}: invalid size {text!r}; expected a whole number of bytes, "
            "optionally followed by K, M or G (binary: 16M = 16 * 2^20)"
        )
    return int(match.group(1)) * _MULTIPLIERS[match.group(2).upper()]


def format_size(n: int) -> str:
    """The shortest exact spelling of `n` bytes, so that `parse_size(format_size(n)) == n`.

    Used in messages and when writing configuration back, where a rounded figure would change the
    meaning of a limit.
    """
    if n < 0:
        raise ValueError(f"a size cannot be negative: {n}")
    for suffix in ("G", "M", "K"):
        unit = _MULTIPLIERS[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
