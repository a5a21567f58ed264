"""uvicorn servers for the app: `EngineServer` (`flamingo serve`, in the foreground) and
`BackgroundServer` (in a background thread, on a free loopback port: for tests, the load
benchmark and the page screenshot)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import uvicorn

from flamingo.serving.engine import Engine


class EngineServer(uvicorn.Server):
    """uvicorn's server that, on Ctrl-C or SIGTERM, also stops the engine at once: the running and
    waiting requests end (their streams close with an error) instead of uvicorn waiting up to its
    graceful-shutdown timeout for them while the engine keeps decoding."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine
        self.stopped_by: int | None = None  # the signal that stopped the server

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.request_stop()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn would raise the signal again here, inside the event loop, where the
            # KeyboardInterrupt cancels the app's lifespan task midway (a logged traceback after a
            # clean shutdown); `flamingo serve` exits with 128 + its number instead.
            captured = getattr(self, "_captured_signals", None)
            if captured:
                self.stopped_by = int(captured[0])
                captured.clear()


class BackgroundServer:
    """`with BackgroundServer(app) as server: httpx.get(server.url + "/health")`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", startup_timeout_s: float = 60.0) -> None:
        self.app, self.host, self.startup_timeout_s = app, host, startup_timeout_s
        self.url = ""

    def __enter__(self) -> "BackgroundServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.url = f"http://{self.host}:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
