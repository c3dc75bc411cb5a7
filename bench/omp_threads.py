"""Why `deltatune serve` runs all torch work in one thread: the same matmul, timed on the main thread, on a second
thread after the main thread has used OpenMP, and on a second thread alone (a fresh process each).

libgomp keeps one thread team per calling thread; once two threads have run parallel torch ops it sees more threads
than cores and stops spinning between parallel regions, so every op pays a wake-up. Run from the project root:

    .venv/bin/python bench/omp_threads.py
"""

from __future__ import annotations

import subprocess
import sys

from machine import cpu_name

CASE = """
import threading, time, torch
w, x = torch.randn(1536, 576), torch.randn(16, 576)
def timed():
    for _ in range(50):
        x @ w.T
    start = time.perf_counter()
    for _ in range(2000):
        x @ w.T
    return (time.perf_counter() - start) / 2000 * 1e6
out = {}
if MAIN:
    out["main thread"] = timed()
t = threading.Thread(target=lambda: out.__setitem__("second thread", timed()))
t.start(); t.join()
print(out)
"""


def main() -> None:
    """Print the time of one (16 x 576) @ (576 x 1536) matmul in each setting."""
    print(f"CPU: {cpu_name()}; torch threads: default")
    for main_first in (True, False):
        code = CASE.replace("MAIN", str(main_first))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        label = "main thread first, then a second thread" if main_first else "a second thread alone"
        print(f"{label}: {out.strip()} (microseconds per matmul)")


if __name__ == "__main__":
    main()
