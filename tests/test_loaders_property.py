"""Property-based: random malformed files give a correct load or a LorafitError, never a traceback."""

import io
import json

import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorafit.config import DataConfig
from lorafit.data import load_data
from lorafit.errors import LorafitError

cells = st.one_of(st.text(max_size=30), st.integers(-3, 6), st.floats(allow_nan=True), st.none(), st.booleans())
frames = st.lists(st.fixed_dictionaries({}, optional={"text": cells, "label": cells, "other": cells}), max_size=25)


def _bytes(kind: str, rows: list[dict], garbage: bytes, cut: float) -> bytes:
    df = pd.DataFrame(rows)
    if kind == "csv":
        data = df.to_csv(index=False).encode()
    elif kind == "tsv":
        data = df.to_csv(index=False, sep="\t").encode()
    elif kind == "jsonl":
        data = "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
    elif kind == "json":
        data = json.dumps(rows, default=str).encode()
    else:
        buf = io.BytesIO()
        try:
            df.astype(str).to_parquet(buf)
        except Exception:  # an empty frame may not serialise; the garbage path still tests the loader
            pass
        data = buf.getvalue()
    data = data[: int(len(data) * cut)] if cut < 1 else data
    return data + garbage


# derandomized: CI runs the same examples every time; run with --hypothesis-seed=random to explore further
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["csv", "tsv", "jsonl", "json", "parquet"]), rows=frames,
       garbage=st.one_of(st.just(b""), st.binary(max_size=40)), cut=st.sampled_from([1.0, 1.0, 0.5, 0.9]))
@example(kind="csv", rows=[{"text": "0", "label": 0.0}], garbage=b"", cut=1.0)  # labels written as 0.0
@example(kind="csv", rows=[{"text": "a", "label": 1.5}, {"text": "b", "label": 0}], garbage=b"", cut=1.0)
def test_loader_loads_or_says_why(tmp_path_factory, kind, rows, garbage, cut):
    path = tmp_path_factory.mktemp("prop") / f"data.{kind}"
    path.write_bytes(_bytes(kind, rows, garbage, cut))
    cfg = DataConfig(train_file=str(path), test_file=str(path), validation_size=1, clean_text=False)
    try:
        bundle = load_data(cfg, seed=0)
    except LorafitError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    # a successful load is a consistent one
    for split in (bundle.train, bundle.validation, bundle.test):
        assert len(split.texts) == len(split.labels)
        assert all(isinstance(t, str) and t.strip() for t in split.texts)
        assert ((split.labels >= 0) & (split.labels < len(bundle.label_names))).all()
