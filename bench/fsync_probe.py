#!/usr/bin/env python3
"""How long an fsync takes on the disk that holds DIR: writes 8 KiB and fsyncs, again and again
for SECONDS, and prints the latency distribution. Every Umbra answer waits for one group commit's
fsync (`[store] synchronous = "full"`), so a stall here is a stall of every request in flight.

Usage: bench/fsync_probe.py [DIR] [SECONDS]   (defaults: the current directory, 10)
"""
import os
import sys
import time


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else "."
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    path = os.path.join(folder, f".fsync-probe-{os.getpid()}")
    block = b"x" * 8192
    latencies = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            latencies.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)
    latencies.sort()
    n = len(latencies)

    def ms(q: float) -> str:
        return f"{latencies[min(n - 1, int(n * q))] * 1e3:.2f}"

    over = lambda limit: sum(1 for x in latencies if x > limit)  # noqa: E731
    print(
        f"{n} fsyncs of 8 KiB in {seconds:.0f} s: p50 {ms(0.5)} ms, p99 {ms(0.99)} ms, "
        f"p99.9 {ms(0.999)} ms, max {latencies[-1] * 1e3:.1f} ms; "
        f"over 25 ms: {over(0.025)}, over 100 ms: {over(0.1)}"
    )


if __name__ == "__main__":
    main()
