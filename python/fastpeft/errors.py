"""peft's exception and warning classes (same names, same hierarchy).

Kept free of heavy imports: the tuners import it.
"""
from __future__ import annotations

__all__ = ["PeftError", "PeftWarning", "NoMatchingPeftModuleError"]


class PeftError(Exception):
    """Base class of the errors fastpeft raises for PEFT-specific conditions (peft's ``PeftError``)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """The adapter being added matched no module of the base model (e.g. ``target_modules`` matched nothing).

    A ``ValueError`` too, as in peft, so ``except ValueError`` keeps working; code that adds such an adapter on
    purpose can catch this class (or ``PeftError``) and go on.
    """


class PeftWarning(UserWarning):
    """Base class of fastpeft's PEFT-specific warnings (peft's ``PeftWarning``)."""
