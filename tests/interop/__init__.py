"""Interop tests (marker `interop`): clients and proxies we did not write against our
server — coturn's uclient, aioice, aiortc, the twilio library, headless Chromium, HAProxy
and nginx, the container image under podman."""
