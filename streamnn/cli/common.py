"""What every command shares: click settings and the one boundary between errors and exit codes.

A command's body runs inside :func:`user_errors`; whatever goes wrong becomes one line on
stderr and an exit status, never a traceback:

=========================================  ====================================  ======
raised                                     printed                               status
=========================================  ====================================  ======
:class:`~streamnn.errors.StreamnnError`    ``Error: <its one-line message>``     1
:class:`OSError` (disk full, read-only,    ``Error: <path>: <strerror>``         1
name too long, permission denied, ...)
:class:`MemoryError` (an allocation       ``Error: out of memory: ...``         1
beyond the memory budget's estimate)
:class:`KeyboardInterrupt` (Ctrl-C)        ``Error: interrupted`` (+ what was    130
                                           kept, when the command says)
:class:`Terminated` (SIGTERM, raised by    the same                              143
:func:`sigterm_as_interrupt`)
=========================================  ====================================  ======

Paths in messages are in :func:`streamnn.paths.path_text` form.

Once :func:`sigterm_as_interrupt` has received a stop signal, *any* exception that reaches
:func:`user_errors` is reported as that stop (130 / 143): the handler raises
KeyboardInterrupt wherever the main thread is, and a C extension may turn it into an
exception of its own (h5py's Cython code reports it as ``TypeError: Operation not defined
for data type class``), which must not become a traceback or exit 1.

With ``ranks=True`` (``streamnn-train``, ``streamnn-eval``, ``streamnn-pack``), under ``mpiexec
-n K`` (K > 1, :mod:`streamnn.dist`), an error the ranks agreed on
(:class:`~streamnn.dist.AgreedError`) is printed once and every rank exits with its status: by
rank 0 when it has it, else by the rank that has it, as ``Error: rank r of K: ...``
(a missing store on one node is not lost); a stop signal (``mpiexec`` passes Ctrl-C and SIGTERM
on to every rank) is printed by rank 0 only and ends the whole job (``MPI_Abort``) with its
status; any other error is printed as ``Error: rank r of K: ...`` (an unexpected exception with
its traceback) and ends the whole job, so no rank is left waiting for one that left.

:func:`fail`, for a bad argument found before the error boundary (every rank finds it alike),
prints once under ``mpiexec -n K``: on rank 0.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import click

from streamnn.dist import AgreedError, launcher_world, leave
from streamnn.errors import StreamnnError
from streamnn.paths import path_text
from streamnn.threads import AUTO, check_threads

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def cache_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--cache DIR`` and ``--cache-limit SIZE`` for a command that reads a store by URL: they set
    ``STREAMNN_REMOTE_CACHE`` and ``STREAMNN_REMOTE_CACHE_LIMIT`` (docs/remote.md, "Local cache")
    for the command and the processes it starts; the command's function does not see them."""
    from streamnn.data.remote.cache import DEFAULT_LIMIT, parse_size

    def limit(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            try:
                parse_size(value, "--cache-limit")
            except StreamnnError:
                raise click.BadParameter(f"{value!r} is not a size (e.g. 2G, 500M or 1048576)") from None
            os.environ["STREAMNN_REMOTE_CACHE_LIMIT"] = value

    def folder(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            os.environ["STREAMNN_REMOTE_CACHE"] = os.path.abspath(value)

    # applied to the command made, in this order (its options are listed in the order they are added)
    command = click.option("--cache", metavar="DIR", type=click.Path(file_okay=False), expose_value=False,
                           callback=folder, help="A store read by URL: keep its blocks in this local folder "
                           "(shared by the processes of this machine), so later epochs read the disk.")(command)
    return click.option("--cache-limit", metavar="SIZE", expose_value=False, callback=limit,
                        help=f"Bytes the --cache folder may hold (e.g. 2G, 500M) [default: {DEFAULT_LIMIT}].")(command)


def threads_option(what: str) -> Callable[[Any], Any]:
    """The ``--threads`` option of the commands that compute (the policy: :mod:`streamnn.threads`): "auto"
    or a positive number; anything else is an ``Error:`` line (printed once under ``mpiexec``), status 1."""
    return click.option("--threads", default=AUTO, show_default=True, metavar="N|auto", callback=_threads,
                        help=f"Threads (BLAS threads, or the worker threads of a CNN that computes in blocks): "
                        f"auto = {what}, or a number.")


def _threads(ctx: click.Context, param: click.Parameter, value: str) -> str | int:
    try:
        return check_threads(value)
    except StreamnnError as exc:
        fail(str(exc))


class _Unshown(click.UsageError):
    """A usage error that another rank prints."""

    def show(self, file: Any = None) -> None:
        pass


class Command(click.Command):
    """A command whose usage errors (a bad option value, a missing argument: every rank meets them
    alike) are printed once under ``mpiexec -n K``, by rank 0, as :func:`fail` prints its errors."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _usage_errors_on_rank_0():
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_errors_on_rank_0():
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors_on_rank_0() -> Iterator[None]:
    try:
        yield
    except click.UsageError as exc:
        if _launched_rank() == 0:
            raise
        raise _Unshown(exc.message, exc.ctx) from None


def fail(message: str, status: int = 1) -> NoReturn:
    """Print ``Error: message`` on stderr and exit with ``status``: an error every process of the
    command meets alike (a bad argument), so under ``mpiexec -n K`` rank 0 alone prints it."""
    if _launched_rank() == 0:
        click.echo(f"Error: {message}", err=True)
    sys.exit(status)


def fail_here(message: str, status: int = 1) -> NoReturn:
    """Print ``Error: message`` on stderr and exit with ``status``, on whichever process has it."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(status)


def _launched_rank() -> int:
    """This process's rank in the launcher's environment (0 outside one, or in a malformed one)."""
    try:
        return launcher_world()[0]
    except StreamnnError:
        return 0


def os_error_message(exc: OSError) -> str:
    """``<path>: <what the errno means>`` for an OSError (the path when it names one)."""
    what = exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or str(exc)
    if exc.filename is None:
        return what
    where = path_text(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {path_text(exc.filename2)}"
    return f"{where}: {what}"


def memory_error_message(exc: MemoryError) -> str:
    """What an allocation that failed (beyond the memory budget's estimate) tells the user."""
    what = str(exc).strip().rstrip(".") or "an allocation failed"
    return (f"out of memory: {what} (more than the memory available, or than ulimit -v leaves: use a smaller "
            "model or batch size)")


@contextlib.contextmanager
def user_errors(interrupted: str | Callable[[], str] = "interrupted", *, ranks: bool = False) -> Iterator[None]:
    """Turn streamnn errors, OS errors and Ctrl-C raised inside into ``Error: ...`` and an exit status
    (``ranks``: as one of the ranks of an MPI job, see the module docstring). ``interrupted`` is
    what a stop prints after ``Error:`` (a function: asked once stopped)."""
    report = rank_fail if ranks else fail_here

    def stopped(status: int) -> NoReturn:
        message = interrupted() if callable(interrupted) else interrupted
        if ranks:
            rank_fail(message, status, stop=True)
        fail_here(message, status)

    try:
        try:
            yield
        except Exception:
            if _active is None or _active.signum is None:
                raise
            raise _active.exception() from None  # the stop signal, in another exception's clothes
    except AgreedError as exc:
        cause = exc.__cause__
        message = os_error_message(cause) if isinstance(cause, OSError) else str(exc)
        if ranks:
            rank_fail(message, 1, agreed=True, where=exc.where)
        fail_here(message)
    except StreamnnError as exc:
        report(str(exc))
    except OSError as exc:
        report(os_error_message(exc))
    except MemoryError as exc:
        report(memory_error_message(exc))
    except Terminated:
        stopped(143)
    except KeyboardInterrupt:
        stopped(130)
    except Exception as exc:  # a bug: its traceback, and under mpiexec no rank left waiting for this one
        if not ranks or _launched_size() <= 1 or isinstance(exc, (click.ClickException, click.exceptions.Exit)):
            raise
        rank, size = launcher_world()
        click.echo(f"Error: rank {rank} of {size}: unexpected error (a bug in streamnn):\n"
                   f"{traceback.format_exc().rstrip()}", err=True)
        leave(1)


#: Longest wait of a rank that prints nothing, on a stop signal, before it ends the job itself:
#: rank 0, stopped by the same signal, prints its line and ends the job first (this rank with it).
#: 0.5 s lost rank 0's line about once in twenty runs on 2 busy cores.
STOP_GRACE_SECONDS = 3.0


def _launched_size() -> int:
    try:
        return launcher_world()[1]
    except StreamnnError:
        return 1


def rank_fail(message: str, status: int = 1, *, agreed: bool = False, stop: bool = False,
              where: str | None = None) -> NoReturn:
    """:func:`fail`, on one of K > 1 MPI ranks: an ``agreed`` error is printed once: by rank 0 when
    it has it (``where`` None), else by the rank holding the message, prefixed with
    ``where`` (the ranks that have it); an empty message by nobody. A ``stop`` signal (every rank
    received it) is printed by rank 0 alone and ends the job; another error names the rank and
    ends the job."""
    try:
        rank, size = launcher_world()
    except StreamnnError:  # a malformed launcher environment: report it as one process
        rank, size = 0, 1
    if size == 1:
        fail_here(message, status)
    if agreed:
        if message and (where is not None or rank == 0):
            click.echo(f"Error: {where + ': ' if where else ''}{message}", err=True)
        sys.exit(status)
    if stop:
        if rank == 0:
            click.echo(f"Error: {message}", err=True)
        else:
            time.sleep(STOP_GRACE_SECONDS)
        leave(status)
    click.echo(f"Error: rank {rank} of {size}: {message}", err=True)
    leave(status)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill <pid>``), raised like Ctrl-C so that it cleans up the same way."""


class StopRequest:
    """The first SIGINT/SIGTERM received inside :func:`sigterm_as_interrupt` (None: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def exception(self) -> KeyboardInterrupt:
        return Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()

    def check(self) -> None:
        """Raise the stop again if one was received: Python swallows (prints as "Exception
        ignored in ...") an exception that a signal handler raises while a destructor or a
        weakref callback runs, so long loops call this at safe points."""
        if self.signum is not None:
            raise self.exception()


#: The request of the :func:`sigterm_as_interrupt` block running now, if any.
_active: StopRequest | None = None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[StopRequest]:
    """Inside, SIGTERM raises :class:`Terminated` and SIGINT :class:`KeyboardInterrupt`, once:
    after the first of them, further SIGINT/SIGTERM are ignored (also after the block: the
    command is then exiting), so a second Ctrl-C cannot cut the clean-up short (leaving a
    temporary file or a child behind) or turn the exit into a traceback. Put it outside
    :func:`user_errors`, so that the error message and the exit are covered too.

    The yielded :class:`StopRequest` remembers the signal: if the exception was swallowed
    (raised inside a destructor; that is then not printed), :meth:`StopRequest.check` at the
    command's next safe point raises it again."""
    request = StopRequest()

    def stop(signum: int, frame: object) -> None:
        request.signum = signum
        for sig in previous:  # ignored by the OS from now on, also during interpreter shutdown
            signal.signal(sig, signal.SIG_IGN)
        raise request.exception()

    def unraisable(info: Any) -> None:
        """Once stopping, drop the two messages Python prints for what we do on purpose: the
        stop swallowed by a destructor, and a second signal already pending when it was set
        to be ignored ("Signal N ignored due to race condition")."""
        exc = info.exc_value
        ours = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, OSError) and "race condition" in str(exc))
        if request.signum is None or not ours:
            previous_hook(info)

    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    global _active
    _active = request
    try:
        yield request
    finally:
        _active = None
        if request.signum is None:  # once stopping, the process is on its way out: keep ignoring them
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sys.unraisablehook = previous_hook

