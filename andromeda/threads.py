"""How many CPU threads the computing commands use.

Offers `add_threads_argument(parser)` (the `--threads N` option), `prefer_passive_wait()`,
`free_cores()` and `apply_threads(n)`. PyTorch's default is one intra-op thread per core,
and OpenMP threads that spin while they wait for each other; when other processes already
keep some cores busy, a spinning thread holds a core the thread it waits for needs, and small
operations (one decoding step) become tens of times slower (benchmarks/busy_cpu.py, figures
in benchmarks/RESULTS.md). So the CLI asks OpenMP to let waiting threads sleep, and uses as
many threads as there are free cores: the cores this process may use, less the ones busy
during a short sample of /proc/stat. OMP_NUM_THREADS and OMP_WAIT_POLICY, when set, are
respected; `--threads N` overrides the count.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from andromeda.errors import UserError

# The commands that compute on the CPU and take --threads.
THREADED_COMMANDS = frozenset({"train", "eval", "generate", "chat", "serve"})
SAMPLE_S = 0.1  # long enough for a few scheduler ticks per core, short beside torch's import


def add_threads_argument(p) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for computing (default: OMP_NUM_THREADS if set, else the cores "
                        "not already busy with other processes)")


def prefer_passive_wait() -> None:
    """Let OpenMP's waiting threads sleep instead of spinning, unless the user chose a policy.
    OpenMP reads the variable once, when torch loads it: after that, this does nothing."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def _cpu_times(cpus: set[int]) -> Optional[tuple[int, int]]:
    """(busy, total) jiffies summed over `cpus`, from /proc/stat; None where it is absent."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        values = [int(v) for v in fields[:8]]
        idle = values[3] + values[4]  # idle + iowait
        busy += sum(values) - idle
        total += sum(values)
    return busy, total


def free_cores() -> int:
    """The cores this process may use that are not busy now (at least 1)."""
    cpus = _allowed_cpus()
    first = _cpu_times(cpus)
    if first is None:
        busy_cores = os.getloadavg()[0]
    else:
        time.sleep(SAMPLE_S)
        second = _cpu_times(cpus)
        d_busy, d_total = second[0] - first[0], second[1] - first[1]
        busy_cores = len(cpus) * d_busy / d_total if d_total > 0 else 0.0
    return max(1, min(len(cpus), round(len(cpus) - busy_cores)))


def apply_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads: `threads`, else OMP_NUM_THREADS's choice, else
    free_cores(). Returns the number in use."""
    import torch

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(free_cores())
    return torch.get_num_threads()
