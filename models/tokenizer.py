"""Word-level caption tokenizer, trained on the captions and stored inside a checkpoint's config.json.

Word level (not BPE) because the shapes vocabulary is ~60 words; `train` takes any caption list, so a
user's own captions get their own vocabulary. Unknown words map to <unk>, so any prompt encodes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

PAD, UNK = "<pad>", "<unk>"
_WORDS = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


@dataclass
class WordTokenizer:
    vocab: list[str]
    max_len: int = 24
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.vocab[:2] != [PAD, UNK]:
            raise ValueError(f"vocab must start with {PAD!r}, {UNK!r}; got {self.vocab[:2]}")
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def train(cls, texts: Iterable[str], max_len: int = 24, min_count: int = 1) -> WordTokenizer:
        counts = Counter(w for t in texts for w in words(t))
        kept = sorted(w for w, c in counts.items() if c >= min_count)
        return cls([PAD, UNK, *kept], max_len)

    @property
    def pad_id(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        ids = [self.index.get(w, 1) for w in words(text)][: self.max_len]
        return ids + [0] * (self.max_len - len(ids))

    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long).reshape(-1, self.max_len)

    def to_config(self) -> dict:
        return {"vocab": self.vocab, "max_len": self.max_len}

    @classmethod
    def from_config(cls, cfg: dict) -> WordTokenizer:
        return cls(list(cfg["vocab"]), int(cfg["max_len"]))
