"""Exceptions with messages meant for users: the CLI prints them as one line, no traceback."""

import errno as _errno
import os


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


class OutputWriteError(NexusError):
    """Writing an output found no room: a full disk, a disk quota, or a file-size limit.

    :param path: the file (or directory) that could not be written, under its final name.
    :param errno: ``ENOSPC``, ``EDQUOT`` or ``EFBIG``.
    """

    def __init__(self, path, errno: int):
        hint = {_errno.ENOSPC: "free space on that disk, or choose an output on another one",
                _errno.EDQUOT: "free space within your disk quota, or choose an output elsewhere",
                _errno.EFBIG: "raise the file-size limit (ulimit -f), or choose a filesystem that allows larger "
                              "files"}.get(errno, "free space, or choose an output elsewhere")
        super().__init__(f"cannot write {path}: {os.strerror(errno)} (errno {errno}); {hint}; outputs written "
                         f"before are kept")
        self.path, self.errno = path, errno
