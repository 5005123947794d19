"""The writer lease of a run directory (``RUN/_lease.json``): one writer at a time.

A job that writes a run takes the lease first and renews it every ``HEARTBEAT_S`` seconds;
a second job finds a live lease and refuses, naming the holder. A lease is free when it is
released, when its heartbeat is older than ``STALE_S`` (the holder died on another machine),
or when its holder was a process on this host that no longer exists (a killed job rerun on
the same machine need not wait). Taking it is write-then-read-back: of two jobs that start
at once, the one whose write lands last keeps it and the other sees a foreign owner and
refuses, on a local disk and on S3 alike.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from pipeline import storage

LEASE_FILE = "_lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0
SETTLE_S = 0.3  # between writing a lease and reading it back


class LeaseHeld(RuntimeError):
    """Another live job holds the lease; the message names it and what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Lease:
    """Take with ``acquire()``, keep alive with a heartbeat thread, give back with ``release()``."""

    def __init__(self, run_uri: str, what: str = "pseudo_label.py"):
        self.uri = storage.join(run_uri, LEASE_FILE)
        self.owner = uuid.uuid4().hex
        self.what = what
        self.lost: str | None = None  # set when another writer took the lease from us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "job": self.what, "heartbeat": time.time()}).encode()

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as free
            return None

    def holder_if_live(self) -> dict | None:
        """The current holder's lease if it is someone else's and alive, else None."""
        cur = self._read()
        if cur is None or cur.get("owner") == self.owner:
            return None
        age = time.time() - float(cur.get("heartbeat", 0))
        if age > STALE_S:
            return None
        if cur.get("host") == socket.gethostname() and not _alive(int(cur.get("pid", -1))):
            return None
        return {**cur, "age": age}

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld."""
        for _ in range(2):
            held = self.holder_if_live()
            if held is not None:
                raise LeaseHeld(
                    f"{self.uri}: this run directory is being written by {held.get('job', 'a job')} "
                    f"(pid {held.get('pid')} on {held.get('host')}, heartbeat {held['age']:.0f} s ago); "
                    f"wait for it to finish or use another --output. A lease whose holder died frees itself "
                    f"after {STALE_S:.0f} s.")
            storage.atomic_write_bytes(self.uri, self._body())
            time.sleep(SETTLE_S)
            if (self._read() or {}).get("owner") == self.owner:
                self._thread = threading.Thread(target=self._beat, name="kdpipe-lease", daemon=True)
                self._thread.start()
                return
        raise LeaseHeld(f"{self.uri}: another job took this run directory at the same moment; use another --output")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                cur = self._read()
                if cur is not None and cur.get("owner") != self.owner:
                    self.lost = f"{self.uri}: the lease was taken by pid {cur.get('pid')} on {cur.get('host')}"
                    return
                storage.atomic_write_bytes(self.uri, self._body())
            except Exception as e:  # a transient store error: try again at the next beat
                print(f"[lease] warning: heartbeat failed ({storage.describe_error(e)})", flush=True)

    def check(self) -> None:
        """Raise LeaseHeld if another writer took the lease (call before committing)."""
        if self.lost:
            raise LeaseHeld(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self._read() or {}).get("owner") == self.owner:
                storage.remove(self.uri)
        except Exception:
            pass  # a lease left behind goes stale by itself
