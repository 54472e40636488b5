"""The ``flashserve`` logger: start-up phases and other engine events at INFO, on standard error.

Like vLLM, flashserve configures its own logger (not the root one) so that its start-up lines show without any
set-up by the caller. ``FLASHSERVE_LOGGING_LEVEL`` (default INFO) sets the level; ``FLASHSERVE_CONFIGURE_LOGGING=0``
leaves the logger alone for applications that configure logging themselves.
"""
import logging
import os


def configure_logging() -> None:
    """Give the ``flashserve`` logger a standard-error handler and its level, once (see the module docstring)."""
    logger = logging.getLogger("flashserve")
    if logger.handlers or os.environ.get("FLASHSERVE_CONFIGURE_LOGGING", "1") == "0":
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s] %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("FLASHSERVE_LOGGING_LEVEL", "INFO").upper())
    logger.propagate = False
