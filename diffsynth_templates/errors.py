"""The one error base class: every error this library raises on purpose derives from it.

CLIs catch ``DiffSynthTemplatesError`` and print its message (exit code 2); anything else that escapes is
a bug. Subclasses keep their historical builtin bases too (``ValueError``, ``RuntimeError``, ...), so
``except ValueError`` written by users keeps working.
"""

from __future__ import annotations


class DiffSynthTemplatesError(Exception):
    """Base of every deliberate error in diffsynth_templates; the message says what to do."""
