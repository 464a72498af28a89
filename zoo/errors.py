"""The error hierarchy: every mistake a user can make raises a ZooError subclass that says how to fix it."""

from __future__ import annotations


class ZooError(Exception):
    """Base of every user-facing prior-zoo error; catch this to handle them all."""


class InvalidFactorError(ZooError, ValueError):
    """A Kronecker factor, scale or shape is malformed (not square, not symmetric, not PSD, NaN...)."""


class SingularPrecisionError(ZooError, ValueError):
    """The operation needs a positive-definite precision, and this one is singular."""


class NumericalError(ZooError, ArithmeticError):
    """A computation produced a NaN, an infinity or an impossible value (e.g. a negative KL)."""


class ModelError(ZooError, ValueError):
    """The model cannot be used as asked (no parameters, wrong architecture, unsupported layer...)."""


class DataError(ZooError, ValueError):
    """The data is empty, unreadable or of the wrong shape."""


class ConfigError(ZooError, ValueError):
    """An option has an unsupported value."""


class HubError(ZooError, OSError):
    """A hub repository could not be fetched or published."""


class ArtifactError(ZooError, ValueError):
    """A prior or posterior artifact is missing a file, tampered with, or does not match the model."""
