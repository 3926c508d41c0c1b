"""Progress bars (tqdm) that follow the CLI's verbosity: shown at the default level, hidden by
``-q`` (which raises the ``nexus`` logger to WARNING) and on every process but the main one."""

from __future__ import annotations

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
