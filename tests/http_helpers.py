"""Helpers for tests that start ``flashserve serve`` in a subprocess."""
import time


def wait_until_healthy(httpx, base_url: str, timeout_s: float = 120.0) -> None:
    """Poll ``GET base_url/health`` until it answers 200 or ``timeout_s`` passes (the test's next request then
    fails with the reason)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
