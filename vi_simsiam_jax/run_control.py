"""Run control of pretraining: joining a multi-process run, the SIGTERM vote, the watchdog
that stops a process whose peer is lost, failure reports between processes, exit statuses.

The loop holds one `RunControl` (`controlled`), which it asks after every step whether to save
and stop; everything else here runs beside it.
"""

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import jax
from absl import logging
from jax._src import distributed
from jax.experimental import multihost_utils

# Exit status after a SIGTERM that saved a checkpoint (the shell's 128 + signal number).
EXIT_PREEMPTED = 128 + signal.SIGTERM
# Exit status of a process that stopped because another process of its run was lost or failed
# (EX_TEMPFAIL: relaunching every process resumes the run).
EXIT_LOST_PEER = 75
# How long a failing process waits for its peers to read its failure report before it exits.
_REPORT_WAIT_S = 10.0
_FAILED, _SEEN, _EXITING = "vi_simsiam/failed/", "vi_simsiam/seen/", "vi_simsiam/exiting/"
# Each watchdog's sign of life (a value that changes every second), or _STOPPED once it stops.
_ALIVE, _STOPPED = "vi_simsiam/alive/", "stopped"
# A peer whose sign of life has not changed for this long is dead to a process about to exit: it
# is not waited for (a live watchdog rewrites its sign every second).
_DEAD_AFTER_S = 3.0


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint; rerun to resume."""


class LostPeer(Exception):
    """Another process of a multi-process run died or failed. The process should exit
    (EXIT_LOST_PEER) without JAX's shutdown barrier, which would wait for the lost process."""


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, auto: bool, peer_timeout_s: float) -> None:
    """Joins the multi-controller runtime when asked to (CPU hosts talk through gloo)."""
    if coordinator_address is None and not auto:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The coordination service would abort a process whose peer stopped beating; the watchdog
    # stops it first, with a message (a failed collective at once, a silent peer or no step at
    # peer_timeout_s).
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=int(peer_timeout_s) + 60)


def _client():
    """The coordination service's client in a multi-process run, else None."""
    return distributed.global_state.client if jax.process_count() > 1 else None


class _SignsOfLife:
    """When each peer's sign of life (`_ALIVE`, rewritten every second by its watchdog) last
    changed, as this process saw it; a peer whose watchdog stopped (`_STOPPED`) is not silent."""

    def __init__(self):
        self._seen: dict[str, tuple[str, float]] = {}  # process: (value, when it changed)

    def silent(self, signs: list[tuple[str, str]], seconds: float) -> list[str]:
        """The processes among `signs` (the `_ALIVE` directory) whose sign has not changed
        for `seconds`."""
        now, silent = time.monotonic(), []
        for key, value in signs:
            process = key.rsplit("/", 1)[-1]
            if value == _STOPPED:
                continue
            if self._seen.get(process, (None,))[0] != value:
                self._seen[process] = (value, now)
            elif now - self._seen[process][1] > seconds:
                silent.append(process)
        return silent


def _wait_for_peers(*directories: str) -> None:
    """Waits (up to _REPORT_WAIT_S) until every other process has a key in one of the
    coordination service's `directories` or has died (no sign of life for _DEAD_AFTER_S)."""
    client, me = _client(), str(jax.process_index())
    deadline, signs = time.monotonic() + _REPORT_WAIT_S, _SignsOfLife()
    while time.monotonic() < deadline:
        answered = {key.rsplit("/", 1)[-1] for directory in directories
                    for key, _ in client.key_value_dir_get(directory)}
        answered.update(signs.silent(client.key_value_dir_get(_ALIVE), _DEAD_AFTER_S))
        if len(answered - {me}) >= jax.process_count() - 1:
            return
        time.sleep(0.2)


def exit_now(status: int) -> None:
    """Ends the process without JAX's shutdown barrier, which would wait for a lost or stopped
    peer. Several processes: says so to the coordination service first, and its host (process
    0) waits (up to _REPORT_WAIT_S) for the others to say so too: a process whose coordination
    service ends first is aborted."""
    logging.flush()
    sys.stderr.flush()
    client = _client()
    if client is not None:
        with contextlib.suppress(Exception):
            client.key_value_set(f"{_EXITING}{jax.process_index()}", "1")
            if jax.process_index() == 0:
                _wait_for_peers(_EXITING)
    os._exit(status)


def barrier(name: str, timeout_s: float = 24 * 3600.0) -> None:
    """Waits until every process of a multi-process run reaches barrier `name` (unique per
    call); a process that dies meanwhile makes it fail once the coordination service notices."""
    client = _client()
    if client is not None:
        client.wait_at_barrier(name, int(timeout_s * 1000))


def peer_failure() -> str | None:
    """The error another process of this run reported (`Watchdog.report_failure`), if any."""
    client = _client()
    if client is None:
        return None
    try:
        reports = client.key_value_dir_get(_FAILED)
    except Exception:  # the coordination service went with its process  # noqa: BLE001
        return None
    mine = f"{_FAILED}{jax.process_index()}"
    return next((f"process {key.rsplit('/', 1)[-1]} failed: {value}"
                 for key, value in sorted(reports) if key != mine), None)


def lost_peer_message(cause: str, latest_step: int | None) -> str:
    """What a process says when it stops because of its peer, and how to go on."""
    failure = peer_failure()
    reason = (f"{failure}" if failure else f"{cause}; another process of the run has most likely "
              "died (killed, out of memory, host lost)")
    return (f"Process {jax.process_index()} of {jax.process_count()}: {reason}. Relaunch all "
            "processes with the same command (once the cause is fixed): the run resumes from "
            + (f"the newest checkpoint (step {latest_step})." if latest_step is not None
               else "its start (no checkpoint yet)."))


class Preemption:
    """SIGTERM as a decision the loop reads after every step. One process: a flag its handler
    sets. Several processes: JAX's preemption sync point (jax.distributed's notifier catches a
    SIGTERM sent to any of them), so that all agree on the step at which to save and stop."""

    def __init__(self):
        self._multihost = jax.process_count() > 1
        self._requested = False
        if not self._multihost:  # a Python handler would replace the notifier's
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint after the current step, then exiting.")
        self._requested = True

    def requested(self, done: int) -> bool:
        """Whether to save and stop after step `done`; every process calls it at every step."""
        if self._multihost:
            return multihost_utils.reached_preemption_sync_point(done)
        return self._requested

    def restore(self) -> None:
        if not self._multihost:
            signal.signal(signal.SIGTERM, self._previous)


class Watchdog:
    """In a multi-process run, ends this process (EXIT_LOST_PEER, with a message) when a peer
    reports a failure, when a peer's watchdog gives no sign of life for timeout_s (a process
    that died while this one waits at a barrier, where no collective fails), or when no step
    completes for timeout_s (a lost peer that no collective reports, e.g. one that hangs). The
    step timer is armed by `beat` (after each step; the compilation does not count) and off
    inside `paused()` (saves, barriers, evaluations)."""

    def __init__(self, timeout_s: float, describe: Callable[[str], str]):
        self._timeout_s, self._describe = timeout_s, describe
        self._deadline: float | None = None
        self._stopped = threading.Event()
        self._signs_lock = threading.Lock()  # no sign of life once _STOPPED is written
        self._peer_signs = _SignsOfLife()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
        if jax.process_count() > 1:
            self._thread.start()

    def beat(self) -> None:
        self._deadline = time.monotonic() + self._timeout_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No deadline in the block; re-armed after it (every process leaves it together)."""
        self._deadline = None
        yield
        self.beat()

    def stop(self) -> None:
        """Stops watching; the peers stop watching this process's signs of life."""
        with self._signs_lock:
            self._stopped.set()
            if (client := _client()) is not None:
                with contextlib.suppress(Exception):
                    client.key_value_set(f"{_ALIVE}{jax.process_index()}", _STOPPED,
                                         allow_overwrite=True)

    def _silent_peer(self) -> str | None:
        """Gives this process's sign of life; the first peer whose sign of life has not
        changed for timeout_s, if any."""
        client, mine = _client(), f"{_ALIVE}{jax.process_index()}"
        try:
            with self._signs_lock:
                if self._stopped.is_set():
                    return None
                client.key_value_set(mine, str(time.monotonic()), allow_overwrite=True)
            signs = [sign for sign in client.key_value_dir_get(_ALIVE) if sign[0] != mine]
        except Exception:  # the coordination service went with its process  # noqa: BLE001
            return None
        return next(iter(self._peer_signs.silent(signs, self._timeout_s)), None)

    def report_failure(self, error: BaseException) -> None:
        """Stops watching and tells the peers this process failed with `error`, waiting (up
        to _REPORT_WAIT_S) until each peer has read it or failed too."""
        self.stop()
        client = _client()
        if client is None:
            return
        try:
            client.key_value_set(f"{_FAILED}{jax.process_index()}",
                                 f"{type(error).__name__}: {error}")
            _wait_for_peers(_SEEN, _FAILED)
        except Exception as report_error:  # noqa: BLE001 (the service's process may be gone)
            logging.warning("Could not report the failure to the peers: %s", report_error)

    def _watch(self) -> None:
        while not self._stopped.wait(1.0):
            failure = peer_failure()
            if failure is not None and not self._stopped.is_set():
                sys.stderr.write(f"\n{self._describe(failure)}\n")
                with contextlib.suppress(Exception):
                    _client().key_value_set(f"{_SEEN}{jax.process_index()}", "1")
                exit_now(EXIT_LOST_PEER)
            if (silent := self._silent_peer()) is not None:
                cause = f"process {silent} gave no sign of life for {self._timeout_s:g} s"
                sys.stderr.write(f"\n{self._describe(cause)}\n")
                exit_now(EXIT_LOST_PEER)
            if self._deadline is not None and time.monotonic() > self._deadline:
                sys.stderr.write(f"\nNo progress for {self._timeout_s:g} s. "
                                 f"{self._describe('no step has completed')}\n")
                exit_now(EXIT_LOST_PEER)


@contextlib.contextmanager
def failures_reported(watchdog: Watchdog, latest_step: Callable[[], int | None]
                      ) -> Iterator[None]:
    """Runs the block so that a failure is seen as such by every process: a failed collective
    (a lost peer) raises LostPeer; this process's own error is reported to its peers
    (`Watchdog.report_failure`) and raised."""
    try:
        yield
    except Preempted:
        raise
    except Exception as error:
        # A failed collective (gloo's show as JaxRuntimeError, or ValueError inside orbax's
        # barriers) or a peer's reported failure: this process's error is their consequence.
        if jax.process_count() > 1 and (isinstance(error, jax.errors.JaxRuntimeError)
                                        or "Gloo" in str(error) or peer_failure() is not None):
            watchdog.stop()
            raise LostPeer(lost_peer_message(
                f"a collective failed ({str(error).splitlines()[0]})", latest_step())) from error
        watchdog.report_failure(error)
        raise


class RunControl:
    """The one object the pretraining loop asks after every step whether to save and stop (the
    SIGTERM vote), and whose `paused()` brackets every wait that is not a step (saves, barriers,
    evaluations) so that the watchdog does not take it for a lost peer. Made by `controlled`."""

    def __init__(self, peer_timeout_s: float, latest_step: Callable[[], int | None]):
        self.watchdog = Watchdog(peer_timeout_s, lambda cause: lost_peer_message(
            cause, latest_step()))
        self._preemption = Preemption()

    def save_and_stop(self, done: int) -> bool:
        """After step `done` (every process, every step): whether to save and stop now."""
        self.watchdog.beat()
        return self._preemption.requested(done)

    def paused(self) -> contextlib.AbstractContextManager[None]:
        return self.watchdog.paused()

    def close(self) -> None:
        self.watchdog.stop()
        self._preemption.restore()


@contextlib.contextmanager
def controlled(peer_timeout_s: float, latest_step: Callable[[], int | None]
               ) -> Iterator[RunControl]:
    """A `RunControl` for the block, whose failures every process sees as such
    (`failures_reported`); closed on leaving it, however it ends."""
    control = RunControl(peer_timeout_s, latest_step)
    try:
        with failures_reported(control.watchdog, latest_step):
            yield control
    finally:
        control.close()
