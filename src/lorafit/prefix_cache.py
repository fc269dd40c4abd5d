"""Frozen-prefix caching: when only the top encoder layers train (LoRA on the top layers, or the head alone),
the embeddings and lower layers are frozen and, in eval mode, deterministic. Their output for each text is
computed once and reused in every epoch and evaluation, so a training step runs only the layers that train.

Hand-written because neither PEFT nor Accelerate offers it, and it is the largest speed-up available on a CPU.
It works with the architecture's own forward: during a step the embeddings module is swapped for one that
returns the cached states and the block list for its top part, so masks, pooling and heads stay the model's
own code. Difference from the plain path: no dropout inside the frozen lower layers (they run in eval mode).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional

import torch
from torch import nn

from .data import Collator, Encoded, EncodedDataset, sorted_batches

_BLOCKS = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)$")


class _CachedEmbeddings(nn.Module):
    """Stands in for the embeddings module: returns the cached hidden states of the current batch."""

    def __init__(self):
        super().__init__()
        self.states: Optional[torch.Tensor] = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.states


def _find(model: nn.Module):
    """(parent, attribute) of the encoder's block list and of its embeddings module."""
    blocks = embeddings = None
    for name, module in model.named_modules():
        if blocks is None and isinstance(module, nn.ModuleList) and _BLOCKS.search(name) and len(module) > 0:
            blocks = name
        if embeddings is None and name.split(".")[-1] == "embeddings" and "Embedding" in type(module).__name__:
            embeddings = name
    if blocks is None or embeddings is None:
        return None

    def parent(name):
        path, _, attr = name.rpartition(".")
        return (model.get_submodule(path) if path else model), attr

    return parent(blocks), parent(embeddings)


def first_trained_layer(model: nn.Module) -> Optional[int]:
    """Index of the lowest encoder block with a trainable parameter; the block count if none trains."""
    found = _find(model)
    if found is None:
        return None
    (parent, attr), (emb_parent, emb_attr) = found
    if any(p.requires_grad for p in getattr(emb_parent, emb_attr).parameters()):
        return None
    blocks = getattr(parent, attr)
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(blocks)


class FrozenPrefix:
    """Caches the input of block `k` for every text of each split; runs the model from block k on."""

    def __init__(self, model: nn.Module, k: int, dtype: torch.dtype = torch.bfloat16):
        (self.parent, self.attr), (self.emb_parent, self.emb_attr) = _find(model)
        self.model = model
        self.k = k
        self.dtype = dtype
        self.full_blocks = getattr(self.parent, self.attr)
        self.top_blocks = nn.ModuleList(list(self.full_blocks)[k:])
        self.embeddings = getattr(self.emb_parent, self.emb_attr)
        self.cached = _CachedEmbeddings()
        self.store: dict[str, list[torch.Tensor]] = {}

    @classmethod
    def maybe(cls, model: nn.Module, dtype: torch.dtype) -> Optional["FrozenPrefix"]:
        from .model import is_quantized

        if is_quantized(model):  # a QLoRA base checkpoints activations and computes in its own kernels: no cache
            return None
        k = first_trained_layer(model)
        return cls(model, k, dtype) if k else None

    @torch.inference_mode()
    def compute(self, split: str, enc: Encoded, batch_size: int, pad_id: int, device, autocast=None) -> None:
        """Run embeddings + blocks[:k] once (eval mode) and keep each text's states, trimmed to its length."""
        out: list[Optional[torch.Tensor]] = [None] * len(enc)
        was_training = self.model.training
        self.model.eval()
        collate, dataset = Collator(pad_id), EncodedDataset(enc)
        for idx in sorted_batches([len(x) for x in enc.input_ids], batch_size):
            batch = collate([dataset[i] for i in idx])
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with (autocast() if autocast else contextlib.nullcontext()):
                states = self._prefix(ids, mask)
            for row, i in enumerate(idx):
                out[i] = states[row, : len(enc.input_ids[i])].to(self.dtype).cpu().clone()
        self.model.train(was_training)
        self.store[split] = out

    def _prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states entering block k, computed by the model's own forward cut short at block k."""
        captured: dict[str, torch.Tensor] = {}

        class _Stop(Exception):
            """Raised by the hook: nothing above the prefix needs computing."""

        def before_block_k(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        def after_last_block(module, args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        if self.k < len(self.full_blocks):
            handle = self.full_blocks[self.k].register_forward_pre_hook(before_block_k, with_kwargs=True)
        else:  # every block is frozen: the prefix is the whole encoder
            handle = self.full_blocks[-1].register_forward_hook(after_last_block)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["h"]

    def states(self, split: str, index: torch.Tensor, length: int, device) -> torch.Tensor:
        rows = [self.store[split][i] for i in index.tolist()]
        padded = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=torch.float32)
        for r, s in enumerate(rows):
            padded[r, : s.shape[0]] = s.float()
        return padded.to(device)

    @contextlib.contextmanager
    def active(self, states: torch.Tensor) -> Iterator[None]:
        """Swap in the cached embeddings and the top blocks for one forward call."""
        self.cached.states = states
        setattr(self.emb_parent, self.emb_attr, self.cached)
        setattr(self.parent, self.attr, self.top_blocks)
        try:
            yield
        finally:
            setattr(self.emb_parent, self.emb_attr, self.embeddings)
            setattr(self.parent, self.attr, self.full_blocks)
            self.cached.states = None

    def logits(self, model: nn.Module, batch: dict, split: str, device) -> torch.Tensor:
        states = self.states(split, batch["index"], batch["input_ids"].shape[1], device)
        with self.active(states):
            return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
