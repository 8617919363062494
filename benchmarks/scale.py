"""Scale curve: the same job at growing sizes (shipped GAN, scoring on, `promptmill generate` as a user runs it).

Per size: img/s by wall, img/s in steady state (images over summary.json's `images` phase: first image to last),
the driver's peak RSS (sampled every 0.2 s), and whether Ray Data spilled to disk (its stats in summary.json).
Writes a PNG of the curve. Then planning at bulk sizes (`benchmarks/planning.py`): a `--dry-run`'s driver RSS,
object-store peak, spilled bytes and wall time over synthetic inputs and finished outputs, and the duplicate-id pass
hash-partitioned against sort-based.

    python benchmarks/scale.py [--sizes 1000 10000 100000] [--plot docs/scale.png]
    python benchmarks/scale.py --planning-only [--rows 1000000 10000000 30000000] [--finished 1000000 10000000]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from jobrun import one_model_spec, run_generate, write_prompts  # benchmarks/ is the script folder, first on sys.path
from planning import dedup_strategies, planning
from promptmill.pipelines.batch.job import PHASES


def run(tmp: Path, n: int, batch: int, distinct: int = 2000) -> dict:
    write_prompts(tmp / f"in-{n}.parquet", n, distinct)
    spec = one_model_spec(f"scale-{n}", tmp / f"in-{n}.parquet", tmp / f"out-{n}", "gan", None,
                          {"batch_size": batch}, model="gan")
    timeline: list[tuple[float, int]] = []
    t_epoch = time.time()
    wall, summary = run_generate(tmp, str(n), spec, lambda driver, at: timeline.append((at, driver.memory_info().rss)))
    peak = max((r for _, r in timeline), default=0)
    assert summary["images_total"] == {"gan": n}
    spilled = sum(int(m) for m in re.findall(r"Spilled to disk: (\d+)MB", summary.get("ray_data_stats") or ""))
    return {"n": n, "wall_s": wall, "wall_img_s": n / wall, "steady_img_s": n / summary["phases_s"]["images"],
            "driver_peak_rss_mb": peak / 2**20, "spilled_mb": spilled, "phases_s": summary["phases_s"],
            "file_create_ms": summary["file_create_ms"],
            "rss_by_phase_mb": _rss_by_phase(timeline, summary["phases_s"],
                                             (tmp / f"out-{n}" / "_SUCCESS").stat().st_mtime - t_epoch, wall)}


def _rss_by_phase(timeline: list[tuple[float, int]], phases: dict[str, float], end: float,
                  wall: float) -> dict[str, float]:
    """Peak driver RSS within each phase of run_job, plus 'before' (process start, imports) and 'after' (Ray's
    shutdown, exit). `end`: when run_job finished (the `_SUCCESS` marker it writes last), phases counted back."""
    names = [k for k in PHASES if k in phases and k != "first_image"]  # first_image lies inside images
    bounds, at = [], end
    for k in reversed(names):
        bounds.append((k, at - phases[k], at))
        at -= phases[k]
    bounds = [("before", 0.0, at), *reversed(bounds), ("after", end, wall)]
    return {k: max((r for s, r in timeline if lo <= s < hi), default=0) / 2**20 for k, lo, hi in bounds}


def twin_plot(x: list, left: list[tuple[list, str, str]], right: tuple[list, str, str], xlabel: str, ylabel: str,
              rlabel: str, legend_at: str, path: str) -> None:
    """Series (values, style, label) on a log x axis, one more on a second y axis, one legend for all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for values, style, label in left:
        ax.plot(x, values, style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(x, right[0], right[1], color="gray", label=right[2])
    ax2.set_ylabel(rlabel)
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc=legend_at, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(rows: list[dict], path: str) -> None:
    twin_plot([r["n"] for r in rows],
              [([r["steady_img_s"] for r in rows], "o-", "img/s, steady (first image to last)"),
               ([r["wall_img_s"] for r in rows], "s--", "img/s, wall (with start-up)")],
              ([r["driver_peak_rss_mb"] for r in rows], "^:", "driver peak RSS (MB)"),
              "prompts (shipped GAN, scoring on)", "images / s", "driver peak RSS, MB", "lower right", path)


def plot_planning(rows: list[dict], path: str) -> None:
    new = [r for r in rows if r["case"] == "new output"]
    twin_plot([r["rows"] for r in new],
              [([r["driver_peak_rss_mb"] for r in new], "^-", "driver peak RSS (MB)"),
               ([r["store_peak_mb"] for r in new], "o--", "object store peak (MB)")],
              ([r["wall_s"] for r in new], "s:", "wall s"),
              "input rows (--dry-run planning, new output)", "MB", "wall s", "upper left", path)


def main_planning(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)

        def spec_of(prompts: Path, out: Path) -> dict:
            return one_model_spec("plan", prompts, out, "gan", None, {"batch_size": args.batch_size}, model="gan")

        rows = planning(tmp, args.rows, args.finished, spec_of, args.resume_rows)
        dedup_rows = max(args.rows) if args.dedup_rows is None else args.dedup_rows
        dedup = dedup_strategies(tmp / f"in-{dedup_rows}", dedup_rows) if dedup_rows else {}
    print("| case | rows | finished keys | wall s | driver peak RSS MB | object store peak MB | spilled MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['rows']:,} | {r['finished']:,} | {r['wall_s']:.1f} | {r['driver_peak_rss_mb']:.0f} "
              f"| {r['store_peak_mb']:.0f} | {r['spilled_mb']:.0f} |")
    if dedup:
        print(f"\nduplicate ids over {dedup_rows:,} ids: " + ", ".join(f"{k} {v:.1f} s" for k, v in dedup.items()))
    plot_planning(rows, args.planning_plot)
    print(f"plot: {args.planning_plot}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--plot", default="docs/scale.png")
    ap.add_argument("--planning-only", action="store_true", help="only the planning phase (no images drawn)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--finished", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--resume-rows", type=int, help="the input (one of --rows) the resumes run over; default the largest")
    ap.add_argument("--dedup-rows", type=int, help="the input (one of --rows) the duplicate-id strategies are timed on; "
                    "default the largest, 0 skips")
    ap.add_argument("--planning-plot", default="docs/scale_planning.png")
    args = ap.parse_args()
    if args.planning_only:
        main_planning(args)
        return
    with tempfile.TemporaryDirectory() as d:
        rows = [run(Path(d), n, args.batch_size) for n in args.sizes]
    print("| prompts | wall s | img/s, wall | img/s, steady | driver peak RSS MB | spilled MB | file create ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['wall_s']:.1f} | {r['wall_img_s']:.1f} | {r['steady_img_s']:.1f} | "
              f"{r['driver_peak_rss_mb']:.0f} | {r['spilled_mb']} | {r['file_create_ms']:.2f} |")
    for r in rows:
        print(f"- {r['n']:,}: " + ", ".join(f"{k} {r['phases_s'][k]:.1f}" for k in PHASES if k in r["phases_s"]))
        print("  driver peak RSS MB by phase: " + ", ".join(f"{k} {v:.0f}" for k, v in r["rss_by_phase_mb"].items()))
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
    main_planning(args)


if __name__ == "__main__":
    main()
