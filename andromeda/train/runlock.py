"""One training process per run folder.

Offers `RunLock(run_dir)`, a context manager that holds an exclusive lock on RUN_DIR/.lock
while a run writes the folder. The file names the holder's pid, so a second `train` on the
same `--out` refuses with a line that names the first. The lock itself is an `fcntl.flock`,
which the kernel drops when its holder dies however it dies; a lock file left behind by a
killed process is therefore taken over, with a message naming the dead pid. On exit the lock
file is removed, and so is the run folder if this process created it and left it empty
(a run refused by a check leaves no trace).
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import Optional

from andromeda.errors import UserError

LOCK = ".lock"


def _pid_in(fd: int) -> Optional[int]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: Optional[int] = None
        self._created = False

    def __enter__(self) -> "RunLock":
        self._created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run folder {self.run_dir}: {e.strerror or e}") from None
        for _ in range(10):  # retried only if a holder removed the file between our open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _pid_in(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "another process"
                raise UserError(f"{self.run_dir} is in use by another training run ({who}); "
                                "wait for it to finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise UserError(f"could not lock {self.path}: it keeps being replaced")
        stale = _pid_in(fd)
        if stale is not None and stale != os.getpid():
            print(f"andromeda: taking over the stale lock of {self.run_dir} (pid {stale} is no longer running)",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding the lock: see the inode check above
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created:
            try:
                self.run_dir.rmdir()  # only if empty: nothing was written
            except OSError:
                pass
