"""Progress bars (tqdm) that follow the CLI's verbosity: shown at the default level, hidden by
``-q`` (which raises the ``nexus`` logger to WARNING) and on every process but the main one."""

from __future__ import annotations

import contextlib
import logging


def progress_enabled(main: bool = True) -> bool:
    """Whether this process shows progress bars: the main process, with ``nexus`` logging at INFO or below."""
    return main and logging.getLogger("nexus").getEffectiveLevel() <= logging.INFO


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0, **kwargs):
    """A ``tqdm`` bar (rate and ETA included) over ``total`` units, disabled unless ``enabled`` and
    :func:`progress_enabled`. Use it as a context manager; ``kwargs`` go to ``tqdm``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not progress_enabled(enabled),
                dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def showing(bar):
    """Show ``bar`` (from :func:`progress_bar`) over a block: log records print on lines of their
    own above it instead of after it on its line, and the bar is closed (its line ended) when the
    block ends, an exception included, so that the error reported next starts a line too."""
    if bar.disable:
        with bar:
            yield bar
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with bar, logging_redirect_tqdm(tqdm_class=type(bar)):
        yield bar
