"""A progress line at a steady pace from the driver: images done / total, img/s, ETA, rejected so far.

Ray Data's bars show operators; a user watching a 10-hour job (or its Ray Jobs log) wants one line that says
how far along it is. `promptmill status ID` shows the last one for a submitted job.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)
PREFIX = "progress: "


class Progress:
    def __init__(self, total: int, rejected: int, every_s: float | None = None) -> None:
        self.total, self.rejected = total, rejected
        self.every_s = every_s if every_s is not None else float(os.environ.get("PROMPTMILL_PROGRESS_S", "10"))
        self.done = self.errors = 0
        self.t0 = self.last = time.monotonic()
        self.first: float | None = None  # when the first image arrived (actor start-up + first batch behind it)

    def update(self, images: int, errors: int = 0) -> None:
        if self.first is None and images:
            self.first = time.monotonic()
        self.done += images
        self.errors += errors
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info(self.line())

    def final(self) -> None:
        log.info(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done - self.errors, 0)
        eta = f"ETA {left / rate:.0f} s" if rate > 0 else "ETA -"
        pct = f" ({100 * (self.done + self.errors) / self.total:.0f} %)" if self.total else ""
        return (f"{PREFIX}{self.done} / {self.total} images{pct}, {rate:.1f} img/s, {eta}, {self.rejected} rejected, "
                f"{self.errors} generation errors")
