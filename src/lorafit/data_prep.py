"""The training run's data, from config to batches: load and split (data.py), tokenise and encode each split once,
filter by length, resolve the label numbering, and feed each process its share of every global batch.

    data = prepare_data(cfg, reuse)        # bundle (texts, labels, summary), tokenizer, encoded splits
    loader = training_loader(data.encoded["train"], cfg, pad_id, process_index, num_processes)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .config import Config
from .data import (
    Collator, DataBundle, Encoded, EncodedDataset, LengthGroupedBatches, encode, filter_by_length, load_data,
    pad_token_id,
)
from .errors import LorafitError
from .model import load_tokenizer


@dataclass
class PreparedData:
    bundle: DataBundle  # texts, labels, label names and the summary data.json records
    tokenizer: Any
    encoded: dict[str, Encoded]  # train / validation / test, token ids in row order

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)


def length_stats(lengths: np.ndarray, max_length: int) -> dict[str, Any]:
    if len(lengths) == 0:
        return {}
    width = 8
    top = int(lengths.max())
    counts = np.bincount(lengths // width, minlength=top // width + 1)
    return {
        "mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
        "max": top, "truncated": int((lengths > max_length).sum()), "max_length": max_length,
        "histogram": {"bin_width": width, "counts": counts.tolist()},
    }


def encode_splits(bundle: DataBundle, tokenizer, cfg: Config) -> dict[str, Encoded]:
    encoded = {}
    dropped = {}
    for name in ("train", "validation", "test"):
        split = getattr(bundle, name)
        if len(split.texts) == 0:  # --validation-size 0: no validation split
            encoded[name] = Encoded([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
            continue
        enc = encode(tokenizer, split.texts, cfg.data.max_length, split.labels)
        bundle.summary.setdefault("token_lengths", {})[name] = length_stats(enc.full_lengths, cfg.data.max_length)
        if name != "test":  # the test set is what it is: filtering it would flatter the score
            enc, split, n = filter_by_length(enc, split, cfg.data.min_tokens, cfg.data.max_tokens)
            setattr(bundle, name, split)
            if n:
                dropped[name] = n
        encoded[name] = enc
    if cfg.data.min_tokens or cfg.data.max_tokens:
        bundle.summary["dropped_by_length"] = dropped
    if len(encoded["train"]) == 0:
        raise LorafitError("no training rows left after length filtering; loosen --min-tokens/--max-tokens")
    bundle.summary["sizes"] = {k: len(v) for k, v in encoded.items()}
    return encoded


def prepare_data(cfg: Config, reuse: Optional[dict] = None) -> PreparedData:
    """Load, tokenise and encode the splits, or take them from `reuse` (a dict a search keeps across trials) when
    the same data was encoded for the same backbone."""
    key = ("data", json.dumps([cfg.data.model_dump(mode="json"), cfg.model.model, cfg.train.seed], sort_keys=True))
    if reuse is not None and key in reuse:
        return reuse[key]
    bundle = load_data(cfg.data, cfg.data_seed)
    tokenizer = load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    data = PreparedData(bundle, tokenizer, encode_splits(bundle, tokenizer, cfg))
    if reuse is not None:
        reuse[key] = data
    return data


def resolve_label_offset(cfg: Config, bundle: DataBundle) -> tuple[Config, Optional[str]]:
    """The config with the label offset the data stage used (config.yaml keeps it, so evaluate and --resume read
    the same numbering), and the line to say when it was detected (issue 24: 1-based labels were a silent empty
    class 0)."""
    offset = bundle.summary.get("label_offset", 0)
    if cfg.data.label_offset == offset:
        return cfg, None
    detected = cfg.data.label_offset is None
    cfg = cfg.with_overrides({"label_offset": offset})
    if not (detected and offset):
        return cfg, None
    k = len(bundle.label_names)
    return cfg, (f"labels: the training ids are 1..{k} with no 0, so they count from 1: classes 0..{k - 1} "
                 f"(label_offset 1; predict --labels id writes 1..{k}; --label-offset 0 keeps the ids as they are)")


def check_same_splits(run_dir, recorded: dict[str, list[int]], bundle: DataBundle) -> None:
    """A resumed run trains on the rows it started with (splits.json)."""
    for name in ("train", "validation", "test"):
        if recorded[name] != getattr(bundle, name).source_rows.tolist():
            raise LorafitError(f"{run_dir}: the {name} split differs from the recorded one (splits.json); "
                               "the data changed since the run started, so it cannot be resumed")


class ProcessBatches(torch.utils.data.Sampler):
    """This process's share of each global batch, from `epoch`'s order, starting at global batch `start`.

    The global order is LengthGroupedBatches at the global batch size (per-device batch x processes); each global
    batch is cut in contiguous parts, one per process, so 1 process at batch 8 and 2 at batch 4 train on the same
    rows per step. Hand-written instead of Accelerate's prepared loader, which sets the epoch itself from a
    counter that restarts at 0 in a resumed process (so a resumed run replayed an earlier epoch's order) and
    whose length per process is not the sampler's global length."""

    def __init__(self, order: LengthGroupedBatches, process_index: int = 0, num_processes: int = 1):
        self.order = order
        self.process_index = process_index
        self.num_processes = num_processes
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:  # global batches per epoch: the same on every process
        return len(self.order)

    def __iter__(self) -> Iterator[list[int]]:
        self.order.set_epoch(self.epoch)
        for batch in self.order.batches()[self.start:]:
            if len(batch) < self.num_processes:  # a short last batch: repeat rows so that every process gets one
                batch = (batch * self.num_processes)[: self.num_processes]
            yield np.array_split(np.asarray(batch), self.num_processes)[self.process_index].tolist()


def training_loader(train: Encoded, cfg: Config, pad_id: int, process_index: int = 0,
                    num_processes: int = 1) -> torch.utils.data.DataLoader:
    """The training batches of this process; its batch_sampler (ProcessBatches) is where the loop sets the epoch
    and the global batch to start from."""
    t = cfg.train
    order = LengthGroupedBatches([len(x) for x in train.input_ids], t.batch_size * num_processes, t.seed,
                                 t.group_by_length)
    # the loader gets its own generator so creating an iterator never draws from the global RNG (exact resume)
    return torch.utils.data.DataLoader(EncodedDataset(train), batch_sampler=ProcessBatches(order, process_index,
                                                                                           num_processes),
                                       collate_fn=Collator(pad_id, t.pad_to_multiple_of),
                                       generator=torch.Generator().manual_seed(t.seed))
