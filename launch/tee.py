"""`python -m launch.tee LOG OUT_FD ERR_FD [RENDEZVOUS_MESSAGE]`: copy a node's console into LOG.

The launcher starts this, points its own stdout/stderr at the two pipes and then execs torchrun, so torchrun keeps
the launcher's process id and gets the scheduler's and the terminal's signals itself, exactly as when it is run by
hand. This process copies both pipes to the console and to LOG until torchrun and its workers have closed them.
It ignores the signals that stop a job: exiting first would break torchrun's pipe while it reports failures.
When torchrun's stderr ends in a rendezvous error, RENDEZVOUS_MESSAGE is printed last, as one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO

from launch.rendezvous import is_rendezvous_failure

_TAIL_BYTES = 16384
_IGNORED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def _ignore_stop_signals() -> None:
    for name in _IGNORED:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def start(log_path: Path, rendezvous_message: str | None = None) -> tuple[subprocess.Popen, int, int]:
    """Start the copy; returns it and the write ends of its stdout and stderr pipes (the caller's to keep)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    argv = [sys.executable, "-m", "launch.tee", str(log_path), str(out_r), str(err_r)]
    proc = subprocess.Popen(
        [*argv, *([rendezvous_message] if rendezvous_message else [])],
        pass_fds=(out_r, err_r),
        stdin=subprocess.DEVNULL,
        # Ignored before the interpreter starts (an ignored signal stays ignored across exec), so a signal that
        # arrives while it starts up cannot kill it; its own process group (start_new_session) leaves the
        # terminal's Ctrl-C to torchrun.
        preexec_fn=_ignore_stop_signals,
        start_new_session=True,
    )
    os.close(out_r)
    os.close(err_r)
    return proc, out_w, err_w


class _Tail:
    """The last bytes of a stream, enough to hold the end of a traceback."""

    def __init__(self) -> None:
        self.data = b""

    def add(self, chunk: bytes) -> None:
        self.data = (self.data + chunk)[-_TAIL_BYTES:]


def _copy(fd: int, console: BinaryIO, log: BinaryIO, lock: threading.Lock, tail: _Tail | None) -> None:
    console_open = True
    while chunk := os.read(fd, 65536):
        if console_open:
            try:
                console.write(chunk)
                console.flush()
            except OSError:  # the terminal went away; the log still gets everything
                console_open = False
        with lock:
            log.write(chunk)
            log.flush()
        if tail is not None:
            tail.add(chunk)


def main(argv: list[str]) -> int:
    _ignore_stop_signals()
    log_path, out_fd, err_fd, *message = argv
    lock = threading.Lock()
    tail = _Tail()
    with open(log_path, "wb") as log:
        threads = [
            threading.Thread(target=_copy, args=(int(out_fd), sys.stdout.buffer, log, lock, None)),
            threading.Thread(target=_copy, args=(int(err_fd), sys.stderr.buffer, log, lock, tail)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if message and is_rendezvous_failure(tail.data.decode(errors="replace")):
            line = (message[0] + "\n").encode()
            log.write(line)
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
