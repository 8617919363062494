"""Scheduled ad-creative batches: a cron schedule renders catalog x templates into a prompt table and runs
(or submits) the generate job on it.

A fire's run id is the schedule name plus its scheduled time (UTC), and its output is `<prefix>/<run id>/`,
so a fire whose `_SUCCESS` exists is a no-op and a re-fired slot resumes where it stopped. The rendered
prompts are written next to the run (`<run>/prompts.parquet`) before generating: every run is auditable.
Where the schedule says so, a fire run in this process then reviews itself (`review.auto`: the best N per product
approved as `auto`) and delivers the approved images (`deliver`); both are idempotent, so a re-fired slot finishes
them too, and people can still override on the review page, then `promptmill deliver` again.
"""

from __future__ import annotations

import datetime as dt
import logging
import string
import time
from collections.abc import Callable
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from croniter import croniter
from promptmill.pipelines.delivery.deliver import DeliverSettings, deliver
from promptmill.pipelines.delivery.placements import DEFAULT_PLACEMENTS, parse_colour, parse_placements
from promptmill.pipelines.layout import SUCCESS
from promptmill.pipelines.metadata import metadata_files
from promptmill.pipelines.review.decisions import AUTO_REVIEWER, DecisionLog, best_per_group
from promptmill.pipelines.review.rows import open_run
from promptmill.pipelines.spec import (
    Blocklist,
    ImageFormat,
    MetricsSpec,
    ModelSpec,
    OutputFormat,
    SafeName,
    ScoringSpec,
    SpecError,
    Strict,
    load_spec,
    resolve_env,
    spec_data,
    validated,
)
from promptmill.pipelines.storage import filesystem, join, parquet_bytes, put_atomic
from promptmill.pipelines.tables import list_files
from pydantic import Field, field_validator

log = logging.getLogger(__name__)
PROMPTS = "prompts.parquet"


class CatalogSpec(Strict):
    path: str = Field(description="product catalog Parquet (file, directory or URL)")
    id_column: str = Field(default="sku", description="unique, path-safe product id")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class ScheduleOutput(Strict):
    prefix: str = Field(description="each fire writes to <prefix>/<schedule name>-<UTC time>/")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    format: OutputFormat = "files"
    image_format: ImageFormat = "png"


class AutoReview(Strict):
    best: int = Field(ge=1, strict=False, description="images approved per product (per `per` value) in each fire")
    by: Literal["clip_score", "aesthetic_score"] = Field(default="clip_score", description="score ranked on, best first")
    per: Literal["sku", "template"] = Field(default="sku", description="kept column the best are chosen within")
    skip: list[Literal["near_duplicate", "nsfw"]] = Field(default_factory=lambda: ["near_duplicate", "nsfw"],
                                                         description="flags that keep an image from approval")


class ReviewRules(Strict):
    auto: AutoReview | None = Field(default=None, description="approve automatically after each fire (reviewer "
                                    "`auto`); the review page still overrides")


class DeliverBlock(Strict):
    to: str = Field(description="each fire's approved creatives go to <to>/<run id>/ (`promptmill deliver`)")
    placements: dict[str, str] = Field(default_factory=lambda: dict(p.split("=") for p in DEFAULT_PLACEMENTS.split(",")),
                                       description="placement name -> WIDTHxHEIGHT")
    fit: Literal["crop", "pad"] = Field(default="crop", description="crop: fill the placement; pad: fit the image")
    pad_color: str = Field(default="auto", description="with fit pad: #RRGGBB or auto (the image's border colour)")
    image_format: ImageFormat = Field(default="jpeg", description="encoding of the delivered files")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="for `to` (default: the output's)")

    @field_validator("placements")
    @classmethod
    def _placements(cls, v: dict[str, str]) -> dict[str, str]:
        parse_placements(v)
        return v

    @field_validator("pad_color")
    @classmethod
    def _pad(cls, v: str) -> str:
        parse_colour(v)
        return v

    def settings(self) -> DeliverSettings:
        return DeliverSettings(tuple(parse_placements(self.placements)), self.fit, self.image_format,
                               parse_colour(self.pad_color))


class ScheduleSpec(Strict):
    name: SafeName = Field(description="schedule name, part of every run id")
    cron: str = Field(description="five-field cron expression, e.g. '0 6 * * 1-5'")
    timezone: str = Field(default="UTC", description="IANA zone the cron expression is read in")
    start: dt.datetime = Field(strict=False, description="first slot considered (catch-up never goes further back)")
    catchup: bool = Field(default=False, description="true: run every missed slot since start, oldest first; "
                          "false: run only the latest missed slot")
    catalog: CatalogSpec
    templates: list[str] = Field(min_length=1, description="prompt templates with {column} placeholders")
    blocklist: Blocklist = Field(default_factory=lambda: Blocklist())
    models: list[ModelSpec] = Field(min_length=1)
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    output: ScheduleOutput
    seed: int = 0
    submit_address: str | None = Field(default=None, description="Ray dashboard URL: submit each fire as a Ray "
                                       "job instead of running it in this process")
    pass_aws_credentials: bool = Field(default=False, description="with submit_address: send this process's AWS "
                                       "keys with each job (readable through the Jobs API; default: the "
                                       "cluster's own identity)")
    review: ReviewRules = Field(default_factory=ReviewRules, description="what happens to a fire's images after it")
    deliver: DeliverBlock | None = Field(default=None, description="deliver the approved images after each fire")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a valid cron expression")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r}") from None
        return v

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        for i, t in enumerate(v):
            try:
                parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(t) if f is not None]
            except ValueError as e:
                raise ValueError(f"templates[{i}] {t!r}: {e}") from None
            # plain {column} only: a format spec such as {size:>50000000} makes 50 MB prompts, {a[0]} / {a.b} reach
            # into objects
            bad = [f"{{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}" for f, spec, conv in parts
                   if not f.isidentifier() or spec or conv]
            if bad:
                raise ValueError(f"templates[{i}] {t!r}: placeholders must be plain {{column}} names, got {bad}")
        return v

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def load_schedule(path: str) -> ScheduleSpec:
    return validated(ScheduleSpec, *spec_data(path, kind="schedule"))


def live(s: ScheduleSpec) -> ScheduleSpec:
    """`s` with its `${NAME}` references resolved from this process's environment, for the schedule's own storage
    calls (catalog, done-check, the prompt table), at fire time; what a fire submits keeps the references (they
    resolve on the cluster)."""
    return validated(ScheduleSpec, resolve_env(s.model_dump(mode="json"), kind="schedule"), f"schedule {s.name}")


# ---------------------------------------------------------------- slots

def _aware(t: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=zone)


def slot_at_or_before(s: ScheduleSpec, t: dt.datetime) -> dt.datetime:
    """The latest fire time <= t (a time that is itself a slot is that slot)."""
    t = _aware(t, s.zone()).astimezone(s.zone())
    it = croniter(s.cron, t + dt.timedelta(seconds=1))
    return it.get_prev(dt.datetime)


def slots_between(s: ScheduleSpec, after: dt.datetime, until: dt.datetime) -> list[dt.datetime]:
    """Fire times in [after, until]."""
    zone = s.zone()
    it = croniter(s.cron, _aware(after, zone).astimezone(zone) - dt.timedelta(seconds=1))
    out = []
    while (t := it.get_next(dt.datetime)) <= _aware(until, zone):
        out.append(t)
    return out


def next_slot(s: ScheduleSpec, now: dt.datetime) -> dt.datetime:
    return croniter(s.cron, _aware(now, s.zone()).astimezone(s.zone())).get_next(dt.datetime)


def run_id(s: ScheduleSpec, slot: dt.datetime) -> str:
    return f"{s.name}-{slot.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}"


def run_url(s: ScheduleSpec, slot: dt.datetime) -> str:
    return join(s.output.prefix, run_id(s, slot))


def is_done(s: ScheduleSpec, slot: dt.datetime) -> bool:
    fs, root = filesystem(run_url(s, slot), s.output.storage_options)
    return fs.exists(join(root, SUCCESS))


# ---------------------------------------------------------------- rendering

def render_prompts(s: ScheduleSpec) -> pa.Table:
    """catalog x templates -> (id, prompt, sku, template): ids are `<sku>-t<template index>`."""
    fs, files = list_files(s.catalog.path, s.catalog.storage_options, "catalog.path")
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    catalog = pa.concat_tables(tables) if tables else pa.table({})
    if s.catalog.id_column not in catalog.column_names:
        raise SpecError(f"catalog.id_column: {s.catalog.id_column!r} is not a column of {s.catalog.path} "
                        f"(columns: {catalog.column_names})")
    for i, t in enumerate(s.templates):
        missing = [f for _, f, _, _ in string.Formatter().parse(t) if f and f not in catalog.column_names]
        if missing:
            raise SpecError(f"templates[{i}] {t!r}: no catalog column {missing} (columns: {catalog.column_names})")
    ids, prompts, skus, tmpl = [], [], [], []
    for row in catalog.to_pylist():
        sku = row[s.catalog.id_column]
        for i, t in enumerate(s.templates):
            values = {k: ("" if v is None else v) for k, v in row.items()}
            ids.append(f"{sku}-t{i}" if sku is not None else None)
            prompts.append(t.format(**values))
            skus.append(None if sku is None else str(sku))
            tmpl.append(i)
    return pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(prompts, pa.string()),
                     "sku": pa.array(skus, pa.string()), "template": pa.array(tmpl, pa.int32())})


def job_data(s: ScheduleSpec, slot: dt.datetime) -> dict[str, Any]:
    """The generate spec of one fire, as data (it is also what a submission ships)."""
    url = run_url(s, slot)
    return {
        "name": run_id(s, slot), "seed": s.seed,
        "input": {"path": join(url, PROMPTS), "id_column": "id", "prompt_column": "prompt",
                  "storage_options": s.output.storage_options, "blocklist": s.blocklist.model_dump(),
                  "keep_columns": ["sku", "template"]},  # each image says which product and template it is for
        "models": [m.model_dump() for m in s.models],
        "scoring": s.scoring.model_dump(), "metrics": s.metrics.model_dump(),
        "output": {"path": url, "storage_options": s.output.storage_options, "format": s.output.format,
                   "image_format": s.output.image_format},
    }


def review_and_deliver(s: ScheduleSpec, slot: dt.datetime) -> dict[str, Any]:
    """After a fire: `review.auto` approvals (once per run: not again when `auto` already decided there), then
    delivery of whatever is approved now (idempotent). `s`: the live schedule."""
    out: dict[str, Any] = {}
    url, opts = run_url(s, slot), s.output.storage_options
    rules = s.review.auto
    if (rules or s.deliver) and not metadata_files(*filesystem(url, opts))[0]:
        return {"review": "no images to review (every row rejected?)"}
    if rules is not None:
        fs, root = filesystem(url, opts)
        decisions = DecisionLog(fs, root)
        done = decisions.refresh()
        if not pc.any(pc.equal(done["reviewer"], AUTO_REVIEWER)).as_py():
            run, _ = open_run(url, opts)
            latest = decisions.latest()
            keys = best_per_group(run.metadata, rules.best, rules.by, rules.per, tuple(rules.skip),
                                  exclude=latest.filter(pc.equal(latest["decision"], "reject")))
            decisions.decide(keys, "approve", f"auto: best {rules.best} per {rules.per} by {rules.by}", AUTO_REVIEWER)
            out["auto_approved"] = len(keys)
    if s.deliver is not None:
        d = s.deliver
        out["delivered"] = deliver(url, join(d.to, run_id(s, slot)), d.settings(), opts,
                                   d.storage_options or None).as_dict()
    return out


def fire(s: ScheduleSpec, slot: dt.datetime, dry_run: bool = False) -> dict[str, Any]:
    """Run (or submit) one slot. Returns what happened, for the log."""
    rid, own = run_id(s, slot), live(s)
    if is_done(own, slot):
        return {"run": rid, "status": "already complete", **review_and_deliver(own, slot)}
    table = render_prompts(own)
    data = job_data(s, slot)
    if dry_run:
        blocked = s.blocklist.compiled()
        for r in table.to_pylist():
            mark = "BLOCKED " if blocked is not None and blocked.search(r["prompt"]) else ""
            print(f"{r['id']}\t{mark}{r['prompt']}")
        return {"run": rid, "status": "dry run", "prompts": table.num_rows, "output": data["output"]["path"],
                "models": [m.name for m in s.models], "submit_address": s.submit_address,
                "review_auto": s.review.auto.model_dump() if s.review.auto else None,
                "deliver_to": join(own.deliver.to, rid) if own.deliver else None}
    spec = load_spec(data)  # the spec is valid before anything is written
    fs, root = filesystem(run_url(own, slot), own.output.storage_options)
    prompts_path = join(root, PROMPTS)
    if not fs.exists(prompts_path):  # a re-fired slot keeps the table it first rendered
        put_atomic(fs, prompts_path, parquet_bytes(table))
    if s.submit_address:
        from promptmill.pipelines.ops.submit import submit

        sid, created = submit(data, s.submit_address, s.pass_aws_credentials)
        if s.review.auto or s.deliver:  # the job ends on the cluster, after this returns
            log.warning("%s: submitted; review.auto and deliver run once it is done, by `promptmill schedule %s --once "
                        "--at %s` (or `promptmill deliver`)", rid, "SCHEDULE.yaml", slot.isoformat())
        return {"run": rid, "status": "submitted" if created else "already submitted", "submission_id": sid}
    from promptmill.pipelines.batch.job import run_job

    result = run_job(spec)
    return {"run": rid, "status": "complete", "line": result.line(), "rejected": result.rejected,
            **review_and_deliver(own, slot)}


def due_slots(s: ScheduleSpec, now: dt.datetime) -> list[dt.datetime]:
    """Slots to run now: every missed one (catchup) or only the latest."""
    own = live(s)
    slots = [t for t in slots_between(s, s.start, now) if not is_done(own, t)]
    return slots if s.catchup else slots[-1:]


def run_forever(s: ScheduleSpec, clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                sleep: Callable[[float], None] = time.sleep, fire_fn: Callable[..., dict] = fire,
                max_fires: int | None = None) -> None:
    """Catch up, then sleep to each next slot and fire it; a failed fire is logged and the loop goes on."""
    fired = 0
    while max_fires is None or fired < max_fires:
        for slot in due_slots(s, clock()):
            log.info("firing %s", run_id(s, slot))
            try:
                log.info("%s", fire_fn(s, slot))
            except Exception:  # noqa: BLE001 - a schedule must survive one bad run
                log.exception("fire %s failed; going on to the next slot", run_id(s, slot))
            fired += 1
            if max_fires is not None and fired >= max_fires:
                return
        nxt = next_slot(s, clock())
        wait = max(0.0, (nxt - clock()).total_seconds())
        log.info("next fire %s in %.0f s", run_id(s, nxt), wait)
        sleep(wait)
