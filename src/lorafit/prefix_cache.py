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
import json
import os
import re
import time
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from .data import Encoded
from .evaluate import batched_apply

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


# fp16's largest finite value: hidden states beyond it cannot be stored in fp16
_FP16_MAX = torch.finfo(torch.float16).max


class FrozenPrefix:
    """Caches the input of block `k` for every text of each split; runs the model from block k on.

    Each split's states are one flat (real tokens, hidden) tensor, every text trimmed to its own length and
    found by offset, so the cache holds exactly rows x real tokens x hidden x bytes (see `estimate_bytes`)
    and no per-row tensor overhead. Stored in `dtype`; fp16 storage widens to fp32 if a state overflows it."""

    def __init__(self, model: nn.Module, k: int, dtype: torch.dtype = torch.bfloat16):
        (self.parent, self.attr), (self.emb_parent, self.emb_attr) = _find(model)
        self.model = model
        self.k = k
        self.dtype = dtype
        self.full_blocks = getattr(self.parent, self.attr)
        self.top_blocks = nn.ModuleList(list(self.full_blocks)[k:])
        self.embeddings = getattr(self.emb_parent, self.emb_attr)
        self.cached = _CachedEmbeddings()
        self.flat: dict[str, torch.Tensor] = {}  # split -> (total real tokens, hidden)
        self.offsets: dict[str, np.ndarray] = {}  # split -> row i's states are flat[offsets[i]:offsets[i + 1]]

    @classmethod
    def maybe(cls, model: nn.Module, dtype: torch.dtype) -> Optional["FrozenPrefix"]:
        from .model import is_quantized

        if is_quantized(model):  # a QLoRA base checkpoints activations and computes in its own kernels: no cache
            return None
        k = first_trained_layer(model)
        return cls(model, k, dtype) if k else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat.values())

    @torch.inference_mode()
    def compute(self, split: str, enc: Encoded, batch_size: int, pad_id: int, device, autocast=None) -> None:
        """Run embeddings + blocks[:k] once (eval mode) and keep each text's states, trimmed to its length."""
        offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in enc.input_ids], out=offsets[1:])
        flat = torch.empty(int(offsets[-1]), hidden_size(self.model), dtype=self.dtype)
        was_training = self.model.training
        self.model.eval()

        def store(batch: dict) -> None:
            nonlocal flat
            with (autocast() if autocast else contextlib.nullcontext()):
                states = self._prefix(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            if flat.dtype == torch.float16 and states.abs().amax() > _FP16_MAX:
                flat = flat.float()  # keep exact values rather than inf; the decision is recorded (storage_dtype)
            for row, i in enumerate(batch["index"].tolist()):
                flat[offsets[i]: offsets[i + 1]] = states[row, : offsets[i + 1] - offsets[i]].to(flat.dtype).cpu()

        try:
            batched_apply(enc, batch_size, pad_id, store)
        finally:
            self.model.train(was_training)
        self.flat[split], self.offsets[split] = flat, offsets

    def storage_dtype(self) -> str:
        """The widest dtype any split ended up stored in (fp16 widens to fp32 on overflow)."""
        dtypes = {t.dtype for t in self.flat.values()} or {self.dtype}
        return _DTYPE_NAMES[max(dtypes, key=lambda d: torch.finfo(d).bits)]

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
        flat, offsets = self.flat[split], self.offsets[split]
        padded = torch.zeros(len(index), length, flat.shape[-1], dtype=torch.float32)
        for r, i in enumerate(index.tolist()):
            padded[r, : offsets[i + 1] - offsets[i]] = flat[offsets[i]: offsets[i + 1]]
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


# --- deciding whether, and how, to cache --------------------------------------------------------------------
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
GB = 1e9


def hidden_size(model: nn.Module) -> int:
    """Width of the hidden states the cache stores (the encoder's hidden size; PEFT forwards `config`)."""
    return int(model.config.hidden_size)


def estimate_bytes(encoded: dict[str, Encoded], hidden: int, dtype: torch.dtype) -> int:
    """Exactly what FrozenPrefix stores: every text's real tokens (no padding) x hidden x bytes per value."""
    tokens = sum(len(ids) for enc in encoded.values() for ids in enc.input_ids)
    return tokens * hidden * dtype.itemsize


def choose_storage_dtype(cache_dtype: str, precision: str) -> torch.dtype:
    """'auto': bf16 under bf16 autocast (the top layers compute in it anyway), else fp16: 11 significant bits,
    half fp32's memory, and on MiniLM in fp32 training a change of at most 0.0001 in validation/test metrics
    against 0.05 from the seed alone (docs/scaling.md); states beyond fp16's range keep their split in fp32."""
    if cache_dtype != "auto":
        return _DTYPES[cache_dtype]
    return torch.bfloat16 if precision == "bf16" else torch.float16


def cache_cap_bytes(cache_max_gb) -> Optional[float]:
    """train.cache_max_gb in bytes: 'auto' is half the memory available now, shared by this machine's
    processes of the run (torchrun and accelerate set LOCAL_WORLD_SIZE); None is no cap."""
    if cache_max_gb is None:
        return None
    if cache_max_gb == "auto":
        import psutil

        return psutil.virtual_memory().available / 2 / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return float(cache_max_gb) * GB


def build_prefix_cache(cfg, model: nn.Module, encoded: dict[str, Encoded], pad_id: int, precision: str, device,
                       autocast, console, reuse: Optional[dict] = None) -> tuple[Optional[FrozenPrefix], dict[str, float], dict]:
    """forward_pass.apply's entry point: decide whether to cache the frozen prefix (train.cache_frozen_prefix,
    a frozen lower part, the size estimate under train.cache_max_gb), build it for every split, and say so.
    `model` is the unwrapped model, `precision` lorafit's resolved one (fp32, bf16, fp16), `autocast` a context
    factory or None. `reuse`: a dict kept across runs (a search) where states of the same texts, backbone,
    frozen layers and storage dtype are taken from instead of computed again.

    Returns (the cache or None, seconds spent per split, the decision for run.json's `prefix_cache`)."""
    from .model import is_quantized

    t = cfg.train
    if not t.cache_frozen_prefix:
        return None, {}, {"enabled": False, "reason": "train.cache_frozen_prefix is off"}
    if is_quantized(model):  # a QLoRA base checkpoints activations and computes in its own kernels: no cache
        return None, {}, {"enabled": False, "reason": "quantized base (model.quantize)"}
    k = first_trained_layer(model)
    if not k:
        return None, {}, {"enabled": False, "reason": "no frozen lower layers (the lowest block trains)"}
    dtype = choose_storage_dtype(t.cache_dtype, precision)
    hidden = hidden_size(model)
    estimate = estimate_bytes(encoded, hidden, dtype)
    cap = cache_cap_bytes(t.cache_max_gb)
    decision = {"from_layer": k, "storage": "ram", "storage_dtype": _DTYPE_NAMES[dtype],
                "estimate_gb": round(estimate / GB, 4), "cap_gb": None if cap is None else round(cap / GB, 3),
                "cap_setting": t.cache_max_gb}
    if cap is not None and estimate > cap:
        console.print(f"frozen-prefix cache off: it would hold {estimate / GB:.2f} GB, above train.cache_max_gb "
                      f"({cap / GB:.2f} GB{', half the available memory' if t.cache_max_gb == 'auto' else ''}); "
                      "every step runs all layers (raise --cache-max-gb, or none for no cap)")
        return None, {}, {"enabled": False, "reason": "estimate above train.cache_max_gb", **decision}
    prefix = FrozenPrefix(model, k, dtype)
    key = ("prefix", json.dumps([cfg.data.model_dump(mode="json"), cfg.model.model, t.seed, k, str(dtype),
                                 precision, sorted(encoded)], sort_keys=True))
    if reuse is not None and key in reuse:
        prefix.flat, prefix.offsets = reuse[key]
        decision.update(enabled=True, reused=True, storage_dtype=prefix.storage_dtype(),
                        size_gb=round(prefix.nbytes / GB, 4))
        return prefix, {split: 0.0 for split in encoded}, decision  # nothing computed in this run
    elapsed = {}
    for split, enc in encoded.items():
        t0 = time.time()
        prefix.compute(split, enc, t.eval_batch_size, pad_id, device, autocast)
        elapsed[split] = time.time() - t0
    if reuse is not None:
        reuse[key] = prefix.flat, prefix.offsets
    decision.update(enabled=True, storage_dtype=prefix.storage_dtype(), size_gb=round(prefix.nbytes / GB, 4))
    console.print(f"cached the frozen embeddings + layers 0..{k - 1} for {sum(map(len, encoded.values()))} texts "
                  f"({prefix.nbytes / GB:.2f} GB {decision['storage_dtype']}) in {sum(elapsed.values()):.1f}s; "
                  f"each step now runs layers {k}+ only")
    return prefix, elapsed, decision
