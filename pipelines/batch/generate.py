"""The generate stage: one model load per actor, one `generate` per batch, raw pixels and metadata columns out.

With `sampling.candidates` K > 1 it draws K per image and keeps the best by `sampling.rerank_by` (DALL-E's rerank). What
follows it in the actor (scoring, writing) is composed around it (`chain.ActorChain`), not known to it.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import ray
from promptmill.models import load_generator
from promptmill.models.generator import resolved_sampling
from promptmill.models.precision import at_precision
from promptmill.models.rerank import generate_best_of
from promptmill.pipelines.batch.isolate import run_isolated
from promptmill.pipelines.batch.score import device_for, rerank_chooser
from promptmill.pipelines.batch.threads import ActorThreads
from promptmill.pipelines.redaction import redact_text
from promptmill.pipelines.spec import ModelSpec, ScoringSpec, parse_size

log = logging.getLogger(__name__)


class GenerateStage:
    def __init__(self, model: ModelSpec, scoring: ScoringSpec, checkpoint_id: str | None = None,
                 threads: int | None = None, checkpoint_label: str | None = None, nsfw: str = "reject", truncate: bool = True,
                 negative_column: str | None = None, size_column: str | None = None) -> None:
        self.threads = ActorThreads(threads)  # the job's count (sizing.actor_threads), on the device thread
        self.device = device_for(model.resources.num_gpus)
        self.model = model
        self.nsfw, self.truncate = nsfw, truncate  # output.nsfw, input.truncate
        self.negative_column, self.size_column = negative_column, size_column  # input.*_column: per-row controls
        self.gen = at_precision(load_generator(model.checkpoint, self.device, model.storage_options, family=model.family,
                                               precision=model.precision, variant=model.variant,
                                               loras=model.loras),
                                self.device, model.precision)
        self.sampling = resolved_sampling(self.gen, model.family_sampling).model_dump()  # what each row records
        # rerank's scorers: those a scoring stage in this actor holds too (`shared_clip`, `shared_judge`)
        self.chooser = rerank_chooser(model, scoring, self.device)
        # metadata rows, WebDataset .json and XMP carry it, as the driver redacted it (it knows which `${NAME}`
        # values it put in)
        self.checkpoint = checkpoint_label or redact_text(model.checkpoint)
        self.checkpoint_id = checkpoint_id  # its content, as preflight identified it (the path alone is not)
        self.node = ray.get_runtime_context().get_node_id()  # provenance: which Ray node drew the image
        log.info("loaded %s (%s) on %s, node %s", model.name, model.family, self.device, self.node)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.on_call()
        return self.draw(batch)

    def _row_controls(self, batch: dict[str, np.ndarray], n: int) -> tuple[list[dict | None], list[str] | None]:
        """Per row: the size its `input.size_column` asks for ({height, width}, None: the model's) and the negative
        prompt of `input.negative_prompt_column` (None for a null: the model's sampling.negative_prompt; the list is
        None without the column)."""
        sizes: list[dict | None] = [None] * n
        if self.size_column:
            for i, v in enumerate(batch[self.size_column]):
                if isinstance(v, str):
                    w, h = parse_size(self.model.sizes.get(v, v))
                    sizes[i] = {"height": h, "width": w}
        if not self.negative_column:
            return sizes, None
        return sizes, [v if isinstance(v, str) else None for v in batch[self.negative_column]]

    def _flags(self, i: int, j: int, info: dict[str, list], reason: np.ndarray, error: np.ndarray,
               nsfw: np.ndarray) -> None:
        """Row i (the call's j-th image): a non-finite image is an error; a flagged one rejected or marked."""
        if info.get("non_finite") and info["non_finite"][j]:
            reason[i], error[i] = "non_finite_output", ("NaN or inf in the image (an fp16 VAE overflow?): try "
                                                        "precision bf16 or fp32")
        flagged = info["nsfw"][j] if info.get("nsfw") else None
        nsfw[i] = None if flagged is None else bool(flagged)
        if flagged and self.nsfw == "reject" and reason[i] is None:
            reason[i], error[i] = "nsfw", "the pipeline's safety checker flagged it (its pixels are black)"

    def draw(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Generate (and score) one batch: its pixels and metadata columns."""
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        n, k = len(prompts), self.model.candidates

        reason, error = np.full(n, None, object), np.full(n, None, object)  # a row not kept: why (rejected/)
        nsfw, truncated = np.full(n, None, object), np.full(n, None, object)
        limit = getattr(self.gen, "max_prompt_tokens", None)
        if limit:  # the text encoder's limit, from the pipeline's own tokenizer
            for i, t in enumerate(self.gen.prompt_tokens(prompts)):
                truncated[i] = t > limit
                if t > limit and not self.truncate:
                    reason[i], error[i] = "prompt_too_many_tokens", f"{t} tokens; the text encoder takes {limit}"

        sizes, negatives = self._row_controls(batch, n)

        def draw_rows(idx: list[int]):
            p, s = [prompts[i] for i in idx], [seeds[i] for i in idx]
            sampling = {**self.sampling, **(sizes[idx[0]] or {})}  # one size per call (the rows are grouped)
            if negatives is not None and negatives[idx[0]] is not None:  # else the model's own (or none)
                sampling["negative_prompt"] = [negatives[i] for i in idx]
            if self.chooser is None:
                images = np.asarray(self.gen.generate(p, s, **sampling))
                return images, np.zeros(len(idx), np.int32), None, getattr(self.gen, "last_info", None)
            best = generate_best_of(self.gen, self.chooser, p, s, k, **sampling)
            return best.images, best.index.astype(np.int32), best.score, best.info

        todo = [i for i in range(n) if reason[i] is None]
        groups: dict[tuple, list[int]] = {}
        for i in todo:  # rows of one size, with or without a negative prompt of their own, together
            key = (tuple(sorted((sizes[i] or {}).items())), negatives is None or negatives[i] is None)
            groups.setdefault(key, []).append(i)
        done, failed = [], {}
        for rows in groups.values():
            d, f = run_isolated(draw_rows, rows)  # a poison row fails alone
            done, failed = done + d, {**failed, **f}
        pixels = np.empty(n, object)  # (H, W, 3) each: rows may differ in size
        index, score = np.zeros(n, np.int32), np.full(n, None, object)
        for idx, (imgs, ci, cs, info) in done:
            index[idx] = ci
            if cs is not None:
                score[idx] = cs
            for j, i in enumerate(idx):
                pixels[i] = imgs[j]
                self._flags(i, j, info or {}, reason, error, nsfw)
        blank = np.zeros((8, 8, 3), np.uint8)  # a row with no image (rejected): never written
        for i in range(n):
            if pixels[i] is None:
                pixels[i] = blank
        if len({p.shape for p in pixels}) == 1:  # one size (the usual batch): a plain array
            pixels = np.stack(list(pixels))
        for i, text in failed.items():
            reason[i], error[i] = "generation_error", text
        batch["pixels"], batch["candidate_index"], batch["candidate_score"] = pixels, index, score
        batch["generation_error"] = error  # the writer sends these rows to rejected/, not to metadata
        batch["reject_reason"] = reason
        batch["nsfw"], batch["prompt_truncated"] = nsfw, truncated
        batch["candidates"] = np.full(n, k, np.int32)
        batch["rerank_by"] = np.full(n, self.model.rerank_by, object)  # null at K = 1: nothing was chosen
        batch["model"] = np.full(n, self.model.name, object)
        batch["family"] = np.full(n, self.model.family, object)
        batch["checkpoint"] = np.full(n, self.checkpoint, object)
        batch["checkpoint_id"] = np.full(n, self.checkpoint_id, object)
        record = {**self.sampling, "candidates": k, **self.model.precision_record}
        batch["sampling"] = np.full(n, json.dumps(record, sort_keys=True), object)
        batch["width"] = np.array([p.shape[1] for p in pixels], np.int32)  # sampling or the row may set the size
        batch["height"] = np.array([p.shape[0] for p in pixels], np.int32)
        default = self.sampling.get("negative_prompt")  # what a row without one of its own was drawn with
        batch["negative_prompt"] = np.array([default if negatives is None or negatives[i] is None else negatives[i]
                                             for i in range(n)], object)
        batch["pipeline_class"] = np.full(n, getattr(self.gen, "pipeline_class", None), object)
        batch["device"] = np.full(n, self.device, object)
        batch["node"] = np.full(n, self.node, object)
        return batch
