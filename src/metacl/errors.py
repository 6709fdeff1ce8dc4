"""User-facing exceptions.

Every message is meant to be read by someone running an experiment from the command line, so it is
a single line that names the offending value and says what would have been accepted instead.
"""


class MetaclError(Exception):
    """Base class for errors caused by the user's configuration or environment, not by a bug."""


class DataNotFoundError(MetaclError):
    """A dataset is missing on disk (or could not be downloaded)."""


class ConfigError(MetaclError):
    """A configuration value is invalid or inconsistent with the others."""
