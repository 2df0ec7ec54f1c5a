"""How many CPU threads the computing commands use.

Offers `add_threads_argument(parser)` (the `--threads N` option), `choose_wait_policy()`,
`free_cores()` and `apply_threads(n)`. PyTorch's default is one intra-op thread per core,
and OpenMP threads that spin while they wait for each other; when other processes keep some
cores busy, a spinning thread holds a core the thread it waits for needs, and small operations
(one decoding step) become tens of times slower. Letting waiting threads sleep at once
(OMP_WAIT_POLICY=PASSIVE) fixes that but costs an idle machine more than half its decoding
speed, since every small operation then pays a wake-up (benchmarks/busy_cpu.py, figures in
benchmarks/RESULTS.md). So, before torch loads, the CLI samples /proc/stat for a moment:

- cores busy with other work: as many threads as there are free cores, passive wait;
- all cores free: a thread per core that spins briefly before it sleeps (GOMP_SPINCOUNT,
  libgomp's knob, at SHORT_SPIN): as fast as PyTorch's default while the machine stays idle,
  and several times less hurt than it if other work starts later.

OMP_NUM_THREADS, OMP_WAIT_POLICY and GOMP_SPINCOUNT, when set, are respected; `--threads N`
overrides the count.
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
SHORT_SPIN = "10000"  # libgomp spin iterations before sleeping; its default is 300000, passive 0
_sampled_free: Optional[int] = None  # free cores measured by choose_wait_policy, reused once


def add_threads_argument(p) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for computing (default: OMP_NUM_THREADS if set, else the cores "
                        "not already busy with other processes)")


def choose_wait_policy() -> None:
    """Set OpenMP's wait policy from the cores free now (see the module docstring), unless the
    user chose one. OpenMP reads the variables once, when torch loads it: after that, this does
    nothing."""
    global _sampled_free
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    _sampled_free = free_cores()
    if _sampled_free < len(_allowed_cpus()):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN


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
    """Set torch's intra-op threads: `threads`, else OMP_NUM_THREADS's choice, else the free
    cores (as sampled by choose_wait_policy, else sampled now). Returns the number in use."""
    global _sampled_free
    import torch

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        free, _sampled_free = (_sampled_free or free_cores()), None
        torch.set_num_threads(free)
    return torch.get_num_threads()
