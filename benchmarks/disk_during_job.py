"""Whether a long files-output job slows as it writes: its image rate over each window beside what creating a
file costs on the same disk at that time (`jobrun.file_create_ms`, 200 new files per probe, from this process).

    python benchmarks/disk_during_job.py [--family gan] [--n 100000] [--every-s 10] [--scoring]

One job, `promptmill generate` as a user runs it (shipped checkpoint, default spec, scoring off unless asked),
started on a settled disk. Rates come from the job's own progress lines (one per window), so they count images
handed back by the generator actors, written.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

from jobrun import SHIPPED_NAME, file_create_ms, one_model_spec, run_generate, write_prompts
from promptmill.pipelines.batch.progress import PREFIX

DONE = re.compile(rf"{PREFIX}(\d+) / ")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="gan", choices=sorted(SHIPPED_NAME))
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--every-s", type=float, default=10)
    ap.add_argument("--scoring", action="store_true")
    args = ap.parse_args()
    os.environ["PROMPTMILL_PROGRESS_S"] = str(args.every_s)  # the job's progress line: one per window
    done: list[tuple[float, int]] = []  # (perf_counter, images so far) per progress line
    probes: list[tuple[float, float]] = []  # (perf_counter, ms per file created)

    def on_stderr(line: bytes) -> None:
        if m := DONE.search(line.decode(errors="replace")):
            done.append((time.perf_counter(), int(m[1])))

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_prompts(tmp / "in.parquet", args.n, distinct=2000)  # as scale.py: 100k distinct renders took 7 s
        spec = one_model_spec("disk", tmp / "in.parquet", tmp / "out", args.family, args.scoring)

        def watch(_driver, _seconds: float) -> None:
            if not probes or time.perf_counter() - probes[-1][0] >= args.every_s:
                probes.append((time.perf_counter(), file_create_ms(tmp)))

        wall, summary = run_generate(tmp, "disk", spec, watch=watch, every_s=0.5, on_stderr=on_stderr)
    print(f"{args.family}, {args.n} prompts, scoring {'on' if args.scoring else 'off'}: wall {wall:.1f} s, "
          f"{args.n / wall:.1f} img/s; file create {summary['file_create_ms']} ms at its start\n")
    print("| window ends, s after the first line | images | img/s over the window | file create ms in it |")
    print("|---|---|---|---|")
    for (t0, n0), (t1, n1) in zip(done, done[1:]):
        if t1 - t0 < args.every_s / 2:  # the final line, just after the last window's: too short for a rate
            continue
        ms = " / ".join(f"{p:.2f}" for t, p in probes if t0 <= t < t1) or "-"
        print(f"| {t1 - done[0][0]:.0f} | {n1} | {(n1 - n0) / (t1 - t0):.0f} | {ms} |")


if __name__ == "__main__":
    main()
