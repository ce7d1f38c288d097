"""What the benchmarks' Hugging Face Trainer peer is fed: the common SFT recipe's padding collator."""
from __future__ import annotations

from typing import Callable


def padding_collator(pad_id: int, counted: list[int] | None = None) -> Callable[[list[dict]], dict]:
    """Pads each batch to its longest example; labels -100 on padding. `counted` gets each batch's real tokens."""
    import torch

    def collate(features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        if counted is not None:
            counted.append(int(mask.sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate
