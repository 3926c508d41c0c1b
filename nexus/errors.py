"""Exceptions with messages meant for users: the CLI prints them as one line, no traceback."""


class NexusError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class FamilyError(NexusError):
    """No family, or the wrong family, for a model."""


class AdapterMismatchError(NexusError):
    """An artifact was made for another base model."""


class Interrupted(NexusError):
    """Stopped by SIGINT/SIGTERM after saving what can be resumed; the CLI exits with :attr:`exit_code`.

    :param message: what was saved and how to resume.
    :param signum: the signal received (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class OutputLockedError(NexusError):
    """Another live process holds the lock of an output directory."""
