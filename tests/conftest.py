"""Shared fixtures: tiny randomly initialised BERT / RoBERTa / DistilBERT models with tokenizers made locally,
and small trained runs. Nothing here touches the network."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)

SAMPLE_TEXTS = [
    "Stocks fall as oil prices climb to record highs on Wall Street",
    "Federer beats Nadal to win the Wimbledon final in five sets",
    "New microchip promises faster computers and longer battery life",
    "Leaders meet in Geneva to discuss the peace plan for the region",
]


def _sample_corpus() -> list[str]:
    from lorafit.config import DataConfig
    from lorafit.data import load_data

    bundle = load_data(DataConfig(max_train_samples=800, max_eval_samples=200), seed=0)
    return bundle.train.texts + SAMPLE_TEXTS


def _wordpiece_tokenizer(out: Path):
    from transformers import BertTokenizerFast

    words = Counter(w for t in _sample_corpus() for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(1500)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    tok.model_max_length = 512
    return tok


def _bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_sample_corpus(), vocab_size=1200, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                               cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    from tokenizers.processors import RobertaProcessing

    tok.backend_tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.model_max_length = 512
    return tok


class CountedTokenizer:
    """A tokenizer that records how many texts each call is given (`calls`); anything else is the tokenizer's."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, batch, **kwargs):
        self.calls.append(len(batch))
        return self.tokenizer(batch, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def write_table(df, path: Path, fmt: str, row_group_size=None) -> None:
    """`df` as an input file in `fmt` (csv, csv.gz, tsv, jsonl, json: one array of records, parquet, txt: the text
    column alone, pkl)."""
    if fmt in ("csv", "csv.gz"):
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif fmt == "json":
        df.to_json(path, orient="records")
    elif fmt == "parquet":
        df.to_parquet(path, row_group_size=row_group_size)
    elif fmt == "txt":
        path.write_text("\n".join(df["text"]) + "\n", encoding="utf-8")
    elif fmt == "pkl":
        df.to_pickle(path)
    else:
        raise ValueError(f"write_table: unknown format {fmt!r}")


def make_tiny_model(family: str, out: Path) -> Path:
    """Save a tiny random encoder of `family` (bert, roberta, distilbert) with its tokenizer to `out`."""
    from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig,
                              RobertaModel)

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    if family == "roberta":
        tok = _bpe_tokenizer()
        config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=160, pad_token_id=1, bos_token_id=0,
                               eos_token_id=2, type_vocab_size=1)
        model = RobertaModel(config)
    else:
        tok = _wordpiece_tokenizer(out)
        if family == "bert":
            config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=160)
            model = BertModel(config)
        elif family == "distilbert":
            config = DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                      max_position_embeddings=160)
            model = DistilBertModel(config)
        else:
            raise ValueError(family)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A factory: tiny_model_dir('bert') -> path of a tiny random BERT with a local tokenizer (cached per family)."""
    cache: dict[str, Path] = {}

    def get(family: str = "bert") -> Path:
        if family not in cache:
            cache[family] = make_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return get


def tiny_config(model_dir: Path, out_dir: Path, **overrides):
    """A config that trains a tiny model on a few hundred bundled rows in seconds."""
    from lorafit.config import Config

    cfg = Config()
    values = dict(
        model=str(model_dir), max_train_samples=240, max_eval_samples=80, max_length=48, epochs=2,
        batch_size=16, eval_batch_size=32, learning_rate=5e-3, lora_r=4, lora_alpha=8, log_every=5,
        output_dir=str(out_dir), run_name="run", param_budget=None, precision="fp32",
    )
    values.update(overrides)
    return cfg.with_overrides(values)


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A completed run directory of a tiny BERT + LoRA (cls pooling), trained once per test session."""
    import lorafit

    out = tmp_path_factory.mktemp("tiny-run")
    run = lorafit.train(tiny_config(tiny_model_dir("bert"), out, pooling="cls"))
    return run.path


def encoder_alone(clf):
    """A loaded classifier without its TF-IDF blend: what the plain PEFT / Transformers code of the model card and
    a merged model compute (the card and `lorafit merge` say so)."""
    assert clf.tfidf is not None  # the default blends: the comparison below would otherwise test nothing new
    clf.tfidf = None
    return clf


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    """A copy of tiny_run that a test may change."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture()
def load_bench():
    """load_bench("accuracy"): a bench/ script as a module (bench/ on sys.path, as when it runs, for its neighbours)."""
    import importlib.util
    import sys

    bench_dir = Path(__file__).resolve().parents[1] / "bench"

    def load(name: str):
        if str(bench_dir) not in sys.path:
            sys.path.insert(0, str(bench_dir))
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
