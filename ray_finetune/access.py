"""Confinement of the paths a run may name: with RAY_FINETUNE_ALLOWED_ROOTS set (folders or URL prefixes such
as s3://team-bucket/), every data path, model folder and checkpoint a run names must lie
inside one of them after symlinks and `..` are resolved. Unset, any path the service can read is allowed.
The list is comma-separated (a `:` would split URLs)."""
from __future__ import annotations

import os
from pathlib import Path

from ray_finetune.errors import ValidationError

ENV = "RAY_FINETUNE_ALLOWED_ROOTS"


def allowed_roots() -> list[str]:
    return [root.strip() for root in os.environ.get(ENV, "").split(",") if root.strip()]


def check_allowed(parameter: str, location: str | Path) -> None:
    """Raise ValidationError when `location` (a local path or a URL) is outside every allowed root."""
    roots = allowed_roots()
    if not roots:
        return
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        if any(text.startswith(root) for root in roots if "://" in root):
            return
    else:
        real = Path(text).expanduser().resolve()   # follows symlinks and removes `..`
        for root in roots:
            if "://" in root:
                continue
            if real == Path(root).expanduser().resolve() or Path(root).expanduser().resolve() in real.parents:
                return
    raise ValidationError(parameter, f"{location} is outside the allowed roots",
                          expected=f"a path under one of {', '.join(roots)} ({ENV})")
