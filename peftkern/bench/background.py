"""Busy background processes for `python -m peftkern bench --background-load N`.

The CPU rows must hold up on a machine where something else is running (a second OpenMP
runtime beside torch's collapsed under load). This module starts N processes that each keep one core
busy with a single-threaded fp32 matmul loop, the kind of work another training or data job does,
for as long as the bench runs, and stops them however the bench ends:

- normal exit, an exception or Ctrl-C: the `BackgroundLoad` context manager's exit (and an atexit
  fallback) terminates them, then kills any that linger;
- SIGTERM to the bench: turned into SystemExit while the load runs, so the same exit path runs;
- either signal arriving where Python drops exceptions (inside a __del__ or a weakref callback, which
  print "Exception ignored" and carry on): remembered, and the block's exit raises SystemExit then, so
  the bench never exits 0 after an interrupt;
- the bench killed outright (SIGKILL): each worker checks its parent's pid between matmuls and exits
  when the parent is gone.
The workers run in their own session, so a Ctrl-C in the terminal reaches only the bench, which then
stops them itself (no tracebacks from the workers).

    python -m peftkern.bench.background PARENT_PID   # one worker; prints "ready" once it is spinning
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys

WORKER_KIND = "single-threaded fp32 256x256 matmul loop (torch), one core each"


def _worker(parent_pid: int) -> int:
    import torch

    torch.set_num_threads(1)  # one busy core per process: N processes = N busy cores
    a, b, c = torch.randn(256, 256), torch.randn(256, 256), torch.empty(256, 256)
    print("ready", flush=True)
    while os.getppid() == parent_pid:  # reparented once the bench has died: stop
        for _ in range(50):  # a few ms of work between parent checks
            torch.mm(a, b, out=c)
    return 0


class BackgroundLoad:
    """Context manager: `with BackgroundLoad(n) as load:` keeps n busy worker processes alive.

    `n` must be a non-negative int (0 starts nothing). `load.pids` lists the workers' pids while the
    block runs; `describe()` is what the bench records in its JSON and table header.
    """

    def __init__(self, n: int, *, start_timeout_s: float = 120.0):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"background load n must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"background load n must be >= 0, got {n}")
        self.n = n
        self.start_timeout_s = start_timeout_s
        self._procs: list[subprocess.Popen] = []
        self._old_handlers: dict = {}
        self.signalled = None  # the signal that interrupted the block, if any

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def describe(self) -> dict:
        return {"processes": self.n, "kind": WORKER_KIND if self.n else None}

    def __enter__(self) -> "BackgroundLoad":
        if self.n == 0:
            return self
        atexit.register(self.stop)
        self._install_handlers()
        try:
            for _ in range(self.n):
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "peftkern.bench.background", str(os.getpid())],
                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True))
            for proc in self._procs:  # measure only once every worker is spinning
                self._wait_ready(proc)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if self.signalled is not None and exc_type is None:  # the interrupt's exception was swallowed
            raise SystemExit(128 + self.signalled)

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(self.start_timeout_s):
                raise RuntimeError(f"background load worker {proc.pid} did not start within "
                                   f"{self.start_timeout_s:.0f} s")
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"background load worker {proc.pid} failed to start "
                               f"(exit code {proc.poll()}, said {line!r})")

    def _install_handlers(self) -> None:
        def on_signal(signum, frame):
            self.signalled = signum
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)  # unwinds through __exit__, which stops the workers

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: rely on __exit__, atexit and the workers' parent check
            self._old_handlers = {}

    def stop(self) -> None:
        """Terminate every worker (SIGTERM, then SIGKILL after 5 s); safe to call more than once."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        handlers, self._old_handlers = self._old_handlers, {}
        for sig, handler in handlers.items():
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass
        atexit.unregister(self.stop)


if __name__ == "__main__":
    sys.exit(_worker(int(sys.argv[1])))
