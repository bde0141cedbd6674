"""The demo's steps, each printed with the seconds it took, so a new user sees where the time goes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StepClock:
    """Times named steps; `summary` prints them all with the total at the end of the demo."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.steps: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"\n== {name}", flush=True)
        began = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - began
            self.steps.append((name, seconds))
            print(f"-- {name}: {seconds:.1f} s", flush=True)

    def summary(self) -> None:
        width = max((len(name) for name, _ in self.steps), default=0)
        print("\nstep times:")
        for name, seconds in self.steps:
            print(f"  {name:<{width}}  {seconds:6.1f} s")
        print(f"  {'total':<{width}}  {time.monotonic() - self.started:6.1f} s", flush=True)
