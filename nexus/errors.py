"""Exceptions with messages meant for users: the CLI prints them as one line, no traceback."""


class NexusError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class FamilyError(NexusError):
    """No family, or the wrong family, for a model."""


class AdapterMismatchError(NexusError):
    """An artifact was made for another base model."""
