"""The root of flashserve's on-disk caches (the demo model, autotuning results)."""
import os


def cache_root() -> str:
    """``$FLASHSERVE_CACHE_DIR`` when set, else ``~/.cache/flashserve``."""
    return os.environ.get("FLASHSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flashserve")
