"""The torch versions relbert-ds supports, checked when the package is imported.

setup.cfg asks for ``torch>=2.4`` with no upper bound, so that installing relbert-ds never
replaces a newer (CUDA) build a user already has. What pip cannot enforce - an older torch
already installed, e.g. with ``--no-deps`` - is refused here with one clear line.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

MIN_TORCH = (2, 4)  # the lower bound in setup.cfg
TESTED_TORCH = (2, 13)  # what the test suite runs on (run.sh installs it where torch is missing)


def parse_version(text: str) -> Optional[tuple[int, int]]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``; None when the text does not start with two numbers."""
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_torch(version: Optional[str] = None) -> None:
    """Raise ImportError for torch older than MIN_TORCH; warn once for one older than tested.

    ``version`` defaults to the installed torch's; an unparsable version (a source build with an
    odd tag) is let through.
    """
    if version is None:
        import torch

        version = torch.__version__
    found = parse_version(str(version))
    if found is None:
        return
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"relbert-ds needs torch>={need}, found torch {version}; fix: pip install -U "
                          f"'torch>={need}' (with your CUDA build's --index-url if you use a GPU)")
    if found < TESTED_TORCH:
        tested = ".".join(map(str, TESTED_TORCH))
        warnings.warn(f"torch {version} is older than the version relbert-ds is tested with ({tested}); "
                      f"it should work, but if something fails, upgrade torch first", stacklevel=2)
