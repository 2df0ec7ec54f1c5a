"""Start and stop `andromeda serve` as a real process for tests: a tiny checkpoint, a free
port on 127.0.0.1 (--port 0; the URL is read from the ready line), bounded waits, and the
process always ended by the test."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from andromeda.checkpoint import save_checkpoint
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.model.transformer import Transformer
from andromeda.presets import get_preset

START_TIMEOUT_S = 60


def tiny_checkpoint(folder: Path, preset: str = "llama-tiny", max_seq_len: int = 128) -> Path:
    cfg = get_preset(preset)
    cfg.max_seq_len = max_seq_len
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # peaked distributions: greedy choices are never near ties
        model.head.weight.mul_(8.0)
    save_checkpoint(folder, model, ByteTokenizer())
    return folder


class ServerProcess:
    def __init__(self, ckpt: Path, *extra: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "andromeda", "serve", "--ckpt", str(ckpt), "--port", "0",
                                      "--threads", "1", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.errors: list[str] = []
        ready = threading.Event()

        def read_out():
            for line in self.proc.stdout:
                self.lines.append(line)
                if "http://" in line:
                    ready.set()
            ready.set()

        def read_err():
            for line in self.proc.stderr:
                self.errors.append(line)

        threading.Thread(target=read_out, daemon=True).start()
        threading.Thread(target=read_err, daemon=True).start()
        if not ready.wait(START_TIMEOUT_S) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("server did not start: " + "".join(self.errors)[-2000:])
        self.url = re.search(r"http://[0-9.]+:\d+", "".join(self.lines)).group(0)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@contextlib.contextmanager
def running_server(ckpt: Path, *extra: str):
    server = ServerProcess(ckpt, *extra)
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate, timeout: float = 10, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
