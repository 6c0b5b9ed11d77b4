"""Caption and instruction templates, filled deterministically per record id.

The template is picked by a hash of (seed, record id) rather than by a running RNG, so a record's
caption does not depend on which slice, split or order it was built in.
"""

from __future__ import annotations

import hashlib
import string
from typing import Sequence

FIELDS = {"name", "a_name"}


def stable_index(seed: int, key: str, n: int) -> int:
    """A uniform-ish index in [0, n) that depends only on (seed, key)."""
    if n <= 0:
        raise ValueError("n must be positive")
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def with_article(noun: str) -> str:
    """'ankle boot' -> 'an ankle boot'; 'pair of trousers' -> 'a pair of trousers'."""
    first = noun.lstrip()[:1].lower()
    return f"{'an' if first in 'aeiou' and first else 'a'} {noun}"


def template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def check_templates(templates: Sequence[str], allowed: set[str], where: str) -> None:
    """Fail early (at build start) on a template with an unknown {field}."""
    for t in templates:
        unknown = template_fields(t) - allowed
        if unknown:
            raise ValueError(
                f"{where}: template {t!r} uses unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
            )


def fill(templates: Sequence[str], seed: int, key: str, **fields: str) -> str:
    template = templates[stable_index(seed, key, len(templates))]
    values = dict(fields)
    if "name" in values and "a_name" not in values:
        values["a_name"] = with_article(values["name"])
    return template.format(**values)
