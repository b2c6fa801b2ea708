"""Start, drain and stop: when the server says it is up, and what SIGTERM does to it.

On SIGTERM each process (the only one, or every worker of ``--workers N``, which the supervisor
passes it on to) turns not ready at once: ``GET /ready`` answers 503, and ``app.state.ready`` is
False for any other readiness route. It goes on answering every request for ``drain_seconds``, so
that a balancer polling readiness has time to send new requests elsewhere. Then uvicorn stops: it
closes the port, lets the requests in flight finish, closes idle connections, and cancels whatever is
still running after its ``timeout_graceful_shutdown``, so that no client can hold the exit up. SIGINT
(Ctrl-C) skips the drain: a person at a terminal wants it to stop. A second SIGTERM stops at once.
"""

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable

import uvicorn
from uvicorn.supervisors import Multiprocess

STARTUP_SECONDS = 300  # how long the supervisor waits for a first worker to load torch and the network


def draining(drain_seconds: float):
    """The app's lifespan: while it runs, SIGTERM turns the app not ready and stops it ``drain_seconds`` later."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # uvicorn has installed its own handler by now; this one delays it. Signals are the main
        # thread's only: an app run in a test client's thread has no drain.
        stop = signal.getsignal(signal.SIGTERM)
        if callable(stop) and threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()

            def on_sigterm(sig: int, frame) -> None:
                if not app.state.ready:  # the second one
                    return stop(sig, None)
                app.state.ready = False
                # A signal handler runs between two bytecodes, maybe inside the loop: hand over safely.
                loop.call_soon_threadsafe(loop.call_later, drain_seconds, stop, sig, None)

            signal.signal(signal.SIGTERM, on_sigterm)  # uvicorn puts the original back when it stops
        yield

    return lifespan


class Server(uvicorn.Server):
    """One process: says it is serving once the port accepts connections, not before."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[], None]):
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.announce()


class Supervisor(Multiprocess):
    """uvicorn's supervisor of ``--workers N``: says it is serving once a worker is, and lets go of the
    port as soon as it stops, so that new connections are refused (a balancer retries them elsewhere)
    rather than queued for workers that no longer accept."""

    def __init__(self, config: uvicorn.Config, sockets, announce: Callable[[], None]):
        super().__init__(config, sockets)
        self.announce = announce

    def init_processes(self) -> None:
        super().init_processes()
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline and not self.should_exit.is_set():
            if any(process.is_ready(timeout=1) for process in self.processes):
                return self.announce()
            if all(process.exitcode is not None for process in self.processes):
                return  # all failed to start: the supervisor's loop reports it and stops
            time.sleep(0.1)

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()
