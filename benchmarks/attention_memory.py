"""Peak CPU memory and time of one ALiBi attention prefill, 'reference' vs 'chunked' backend.

usage: python benchmarks/attention_memory.py {reference|chunked} LENGTH
(one process per measurement, so ru_maxrss is that call's peak; 8 heads, head dim 64)
"""
import resource
import sys
import time

import torch

from andromeda.model.backends import AttnSpec, attend, force_backend

torch.set_num_threads(2)
L, H = int(sys.argv[2]), 8
q, k, v = (torch.randn(1, H, L, 64) for _ in range(3))
pos = torch.arange(L)
spec = AttnSpec(q_pos=pos[None], k_pos=pos, scale=0.125, alibi=2.0 ** -torch.arange(1, H + 1.0), alibi_heads=H)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
with force_backend(sys.argv[1]):
    attend(q, k, v, spec)
seconds = time.perf_counter() - t
peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(sys.argv[1], L, f"{seconds:.2f}s", f"peak+{peak_mib:.0f}MiB")
