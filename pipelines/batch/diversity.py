"""Per-prompt diversity and near-duplicates, from the features the scoring stage stores per image: the judge's
(our shapes models) or, without a judge, the CLIP's image embeddings (any image; `clip_features`).

Computed when the metadata is committed, over the whole committed table: the samples of one prompt can come
from different batches, actors or runs. For each (model, id) with two or more samples:

  diversity       mean pairwise cosine distance between its samples' judge features
  near_duplicate  this sample has a sibling closer than two real renders of one scene ever are (the judge's
                  `near_duplicate_distance`, calibrated on real renders when it was trained); in CLIP space,
                  closer than `scoring.clip_near_duplicate_distance` (benchmarks/near_duplicates.py)

Both stay null for a single sample, without features (scoring off, or neither judge nor CLIP), or, for
near_duplicate, with a judge that carries no calibration. A GAN that draws one image per prompt has diversity near 0 and every
sample a near-duplicate: `images_per_prompt: 4` then buys four copies, and the summary says so.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def annotate(table: pa.Table, threshold: float | None, column: str = "judge_features") -> pa.Table:
    """`table` (sorted by model, id) with its diversity and near_duplicate columns set, from `column`'s features
    (judge_features, or clip_features where there is no judge)."""
    from promptmill.models.judge import pairwise_cosine  # torch: only when committing

    n = len(table)
    diversity = np.full(n, np.nan, np.float32)
    near = np.full(n, -1, np.int8)  # -1: null
    feats = table.column(column)
    if n and feats.null_count < n:
        keys = pc.binary_join_element_wise(table["model"], table["id"], "\x1f").to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[starts[1:], n]
        lists = pa.concat_arrays(feats.chunks) if feats.num_chunks != 1 else feats.chunk(0)
        # offsets (slice-aware) into values (not): numpy views, no Python float per feature
        offsets, values = lists.offsets.to_numpy(), lists.values.to_numpy(zero_copy_only=False)
        valid = lists.is_valid().to_numpy(zero_copy_only=False)
        for a, b in zip(starts, ends):
            idx = [i for i in range(a, b) if valid[i]]
            if len(idx) < 2:
                continue
            d = pairwise_cosine(np.stack([values[offsets[i]:offsets[i + 1]] for i in idx]).astype(np.float32))
            diversity[idx] = d[np.triu_indices(len(idx), 1)].mean()
            if threshold is not None:
                np.fill_diagonal(d, np.inf)
                near[idx] = d.min(1) < threshold
    table = table.set_column(table.schema.get_field_index("diversity"), "diversity",
                             pa.array(diversity, pa.float32(), mask=np.isnan(diversity)))
    return table.set_column(table.schema.get_field_index("near_duplicate"), "near_duplicate",
                            pa.array(near == 1, pa.bool_(), mask=near < 0))
