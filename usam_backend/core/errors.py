"""Exceptions usam raises on purpose.

Every message says what was wrong and what to do about it: the CLI prints it as is, and the HTTP
backend turns it into a JSON error without a traceback.
"""


class UsamError(Exception):
    """Base class of the errors usam reports to its user."""


class ConfigurationError(UsamError):
    """A setting (environment variable or flag) has a value usam cannot use."""


class ImageError(UsamError):
    """An image could not be read, or is outside the limits usam accepts."""


class CheckpointError(UsamError):
    """A SAM checkpoint is missing, could not be downloaded, or failed verification."""


class HeadError(UsamError):
    """A head artifact is missing, unreadable, or does not fit the SAM model in use."""


class DataError(UsamError):
    """Training data (class folders, bags, targets) is missing or malformed."""
