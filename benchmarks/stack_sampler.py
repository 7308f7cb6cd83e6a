"""A tiny all-threads sampling profiler for the fleet benchmarks: where a many-threaded fleet
spends its time, without py-spy. Every `interval` seconds it reads every thread's Python stack
(sys._current_frames) and counts, per function, the samples in which the function is the
innermost frame (self) or anywhere on the stack (total). Threads parked in a wait (a lock, a
queue, a selector) are counted apart as idle, so the table shows the work."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from types import FrameType

# innermost functions that mean "this thread is waiting", not working
IDLE = {("threading.py", "wait"), ("threading.py", "_wait_for_tstate_lock"), ("queue.py", "get"),
        ("selectors.py", "select"), ("socket.py", "accept"), ("threading.py", "join"),
        ("client.py", "_reconnect_wait"), ("client.py", "_loop"), ("client.py", "wait_for_publish"),
        ("base_events.py", "_run_once"), ("time", "sleep")}


def _key(frame: FrameType) -> tuple[str, str]:
    return frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name


class StackSampler:
    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.self_counts: Counter[tuple[str, str]] = Counter()
        self.total_counts: Counter[tuple[str, str]] = Counter()
        self.busy = 0
        self.idle = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> StackSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                leaf = _key(frame)
                if leaf in IDLE or leaf[1] in ("select", "poll", "epoll", "sleep", "recv", "acquire"):
                    self.idle += 1
                    continue
                self.busy += 1
                self.self_counts[leaf] += 1
                seen = set()
                f: FrameType | None = frame
                while f is not None:
                    k = _key(f)
                    if k not in seen:
                        seen.add(k)
                        self.total_counts[k] += 1
                    f = f.f_back

    def table(self, top: int = 15) -> dict:
        """The busiest functions: share of the busy samples as innermost frame and on the stack."""
        n = max(1, self.busy)

        def rows(counts: Counter[tuple[str, str]]) -> list[dict]:
            return [{"function": f"{f}:{fn}", "share": round(c / n, 4)} for (f, fn), c in counts.most_common(top)]

        return {"busy_samples": self.busy, "idle_samples": self.idle, "interval_s": self.interval,
                "self": rows(self.self_counts), "total": rows(self.total_counts)}


def print_table(table: dict, out=sys.stdout) -> None:  # noqa: ANN001
    print(f"busy samples {table['busy_samples']}, idle {table['idle_samples']}", file=out)
    for kind in ("self", "total"):
        print(f"-- {kind}", file=out)
        for row in table[kind]:
            print(f"{row['share']:7.1%}  {row['function']}", file=out)
