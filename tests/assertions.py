"""The "one error line" contract, asserted in one place.

A user error is one line, ``<what is wrong>; fix: <what to do>``: as an exception's message
(:func:`assert_one_line`), and in a command's output as exactly one line starting ``error:``
(:func:`assert_one_error_line`), with no traceback.
"""
from __future__ import annotations

import re
from typing import Any


def assert_one_line(error: Any, *fragments: str) -> str:
    """``error`` (an exception, a ``pytest.raises`` result or a message) is one line with a fix
    and every fragment; returns the message."""
    error = getattr(error, "value", error)
    message = str(error)
    assert "\n" not in message and "fix:" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def error_lines(output: str) -> list[str]:
    """The lines of ``output`` that start with ``error:``."""
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_error_line(output: str, *fragments: str, fix: bool = True, launcher: str = "") -> str:
    """``output`` holds exactly one ``error:`` line (with a fix, unless ``fix`` is False: an agreed
    crash names the failing rank instead), every fragment in it, and no traceback of ours; returns it.
    ``launcher="torchrun"``: torchrun's own report of a failed rank (its traceback) is allowed."""
    errors = error_lines(output)
    assert len(errors) == 1, f"want exactly one 'error:' line, got {len(errors)}\n{output[-4000:]}"
    if launcher == "torchrun":  # torchrun reports a failed rank with a traceback of its own (torch's frames)
        assert not re.search(r'File "[^"]*(relbert_ds|launchers)/', output), output[-4000:]
    else:
        assert "Traceback" not in output, output[-4000:]
    if fix:
        assert "fix:" in errors[0], errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]
