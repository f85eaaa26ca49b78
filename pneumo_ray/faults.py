"""Fault injection at named points, for the fault tests (and for chaos drills on a staging
cluster). Each is off unless its environment variable is set in the driver's environment; an
embedded Ray's processes inherit it, and a job that joins a running cluster passes it to its
workers there (pneumo_ray.runtime.fault_env).

    PNEUMO_RAY_KILL_AFTER_PART=N        the scoring driver SIGKILLs itself once part N is committed
    PNEUMO_RAY_KILL_IN_COMMIT=N         ... or while committing part N: after its .committing
                                        marker, before the part is moved into place
    PNEUMO_RAY_HOLD_AFTER_PART=N:PATH   ... or waits there until PATH exists
    PNEUMO_RAY_HOLD_AFTER_EPOCH=NET:N:PATH  a training worker of network NET waits after it
                                        reports epoch N (its checkpoint) until PATH exists
    PNEUMO_RAY_READ_FAULTS=TEXT:K       the first K read attempts of each image whose URI
                                        contains TEXT fail as a transient read error would
"""

from __future__ import annotations

import os
import signal
import time

KILL_AFTER_PART = "PNEUMO_RAY_KILL_AFTER_PART"
KILL_IN_COMMIT = "PNEUMO_RAY_KILL_IN_COMMIT"
HOLD_AFTER_PART = "PNEUMO_RAY_HOLD_AFTER_PART"
READ_FAULTS = "PNEUMO_RAY_READ_FAULTS"
HOLD_AFTER_EPOCH = "PNEUMO_RAY_HOLD_AFTER_EPOCH"
VARIABLES = (KILL_AFTER_PART, KILL_IN_COMMIT, HOLD_AFTER_PART, READ_FAULTS, HOLD_AFTER_EPOCH)


class InjectedReadError(OSError):
    """A read that failed on purpose (PNEUMO_RAY_READ_FAULTS), like a timeout or a 503."""


def after_commit(part: int, log) -> None:
    """Called by the scoring driver after it commits part ``part`` (numbered from 1)."""
    if os.environ.get(KILL_AFTER_PART) == str(part):
        log(f"{KILL_AFTER_PART}={part}: killing this driver (SIGKILL)")
        os.kill(os.getpid(), signal.SIGKILL)
    hold = os.environ.get(HOLD_AFTER_PART, "")
    if hold.partition(":")[0] == str(part):
        _hold(f"{HOLD_AFTER_PART}: holding after part {part}", hold.partition(":")[2], log)


def _hold(what: str, release: str, log) -> None:
    """Wait until the file ``release`` exists (the test's signal), saying so once."""
    log(f"{what} until {release} exists")
    while not os.path.exists(release):
        time.sleep(0.05)


def after_epoch(network: str, epoch: int, log) -> None:
    """Called by a training worker once it has reported ``epoch`` (numbered from 1) of
    ``network``, checkpoint included. A worker that resumes after that epoch never holds."""
    name, _, rest = os.environ.get(HOLD_AFTER_EPOCH, "").partition(":")
    number, _, release = rest.partition(":")
    if name == network and number == str(epoch):
        _hold(f"{HOLD_AFTER_EPOCH}: [{network}] holding after epoch {epoch}", release, log)


def in_commit(part: int) -> None:
    """Called by the ledger between a part's ``.committing`` marker and its move into place
    (``part`` numbered from 1)."""
    if os.environ.get(KILL_IN_COMMIT) == str(part):
        os.kill(os.getpid(), signal.SIGKILL)


def before_read(uri: str, attempt: int) -> None:
    """Called before each read attempt (numbered from 0) of an image."""
    spec = os.environ.get(READ_FAULTS)
    if spec:
        text, _, count = spec.rpartition(":")
        if text in uri and attempt < int(count):
            raise InjectedReadError(f"injected transient read error (attempt {attempt + 1})")
