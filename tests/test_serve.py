"""`lorafit serve` in process (FastAPI's TestClient): every endpoint, dynamic batching, each bad request, the
API key. The real-process tests (SIGTERM draining, the page in a browser) are in test_serve_process.py."""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

import lorafit
from lorafit.serve import ServeConfig, create_app

from conftest import SAMPLE_TEXTS


@pytest.fixture(scope="module")
def clf(tiny_run):
    return lorafit.load(tiny_run, backend="torch")


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout}s: {client.get('/readyz').json()}")


@contextlib.contextmanager
def serving(run, classifier=None, **options):
    """A started TestClient (lifespan run, model ready) on an app for `run`."""
    with TestClient(create_app(run, ServeConfig(**options), classifier=classifier)) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(tiny_run):
    # loads the run itself (no classifier given): the path `lorafit serve` takes
    with serving(tiny_run, backend="torch", max_texts=8, max_chars=300) as c:
        yield c


def metric(client: TestClient, name: str) -> float:
    text = client.get("/metrics").text
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_classify_matches_the_classifier(client, clf):
    res = client.post("/v1/classify", json={"texts": SAMPLE_TEXTS})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["backend"] == "torch"
    probs = clf.predict_proba(SAMPLE_TEXTS)
    for row, expected in zip(body["results"], probs):
        assert row["label"] == clf.classes_[expected.argmax()]
        assert list(row["probabilities"]) == [clf.classes_[j] for j in np.argsort(-expected, kind="stable")]
        np.testing.assert_allclose([row["probabilities"][c] for c in clf.classes_], expected, atol=1e-5)
        assert row["score"] == max(row["probabilities"].values())
    top = client.post("/v1/classify", json={"texts": SAMPLE_TEXTS[:1], "top_k": 2}).json()["results"][0]
    assert len(top["probabilities"]) == 2 and top["label"] == next(iter(top["probabilities"]))


def test_predict_in_tei_shape(client, clf):
    single = client.post("/predict", json={"inputs": SAMPLE_TEXTS[0]})
    assert single.status_code == 200, single.text
    rows = single.json()
    assert [r["label"] for r in rows][0] == clf.predict(SAMPLE_TEXTS[:1])[0]
    assert len(rows) == len(clf.classes_) and rows == sorted(rows, key=lambda r: -r["score"])
    assert abs(sum(r["score"] for r in rows) - 1) < 1e-4
    batch = client.post("/predict", json={"inputs": SAMPLE_TEXTS[:2]}).json()
    tei_batch = client.post("/predict", json={"inputs": [[t] for t in SAMPLE_TEXTS[:2]], "truncate": True}).json()
    assert [b[0]["label"] for b in batch] == list(clf.predict(SAMPLE_TEXTS[:2])) == [b[0]["label"] for b in tei_batch]
    raw = client.post("/predict", json={"inputs": SAMPLE_TEXTS[0], "raw_scores": True}).json()
    np.testing.assert_allclose(max(r["score"] for r in raw), clf.decision_function(SAMPLE_TEXTS[:1]).max(), atol=1e-4)


def test_model_health_metrics_docs_and_page(client, tiny_run, clf):
    info = client.get("/v1/model").json()
    assert info["labels"] == list(clf.classes_) and info["backend"] == "torch" and info["ready"] is True
    assert info["method"] == "lora" and info["backbone"] and 0 <= info["test_metrics"]["accuracy"] <= 1
    assert info["limits"]["max_texts"] == 8
    assert info["tfidf_weight"] == clf.tfidf.weight == 0.4  # the tiny run blends at the default weight
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    res = client.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    for name in ("lorafit_requests_total", "lorafit_request_duration_seconds_bucket", "lorafit_batch_size_bucket",
                 "lorafit_queue_depth", "lorafit_texts_per_second", "lorafit_batches_total"):
        assert name in res.text
    assert re.search(r'lorafit_requests_total\{path="/v1/model",status="200"\} [1-9]', res.text)
    schema = client.get("/openapi.json").json()
    assert {"/v1/classify", "/predict", "/v1/model", "/metrics"} <= set(schema["paths"])
    assert "texts" in schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "Classify" in page.text and "http" not in page.text.split("<script>")[0].replace(
        'href="/', "")  # no external asset: works offline


BAD = [  # (path, raw body, status, field)
    ("/v1/classify", b'{"texts": ["caf\xe9"]}', 400, None),  # latin-1, not UTF-8
    ("/v1/classify", b'{"texts": ["a", ', 400, None),
    ("/v1/classify", b"", 400, None),
    ("/v1/classify", b'["a text"]', 422, None),
    ("/v1/classify", b'{"texts": "a text"}', 422, "texts"),
    ("/v1/classify", b'{"texts": ["ok", 3]}', 422, "texts[1]"),
    ("/v1/classify", b'{"texts": []}', 422, "texts"),
    ("/v1/classify", b'{"text": ["a"]}', 422, "texts"),
    ("/v1/classify", b'{"texts": ["a"], "top_k": 0}', 422, "top_k"),
    ("/v1/classify", b'{"texts": ["a", "   "]}', 422, "texts[1]"),
    ("/v1/classify", b'{"texts": [' + b",".join([b'"t"'] * 9) + b"]}", 413, "texts"),
    ("/v1/classify", b'{"texts": ["ok", "' + b"x" * 301 + b'"]}', 422, "texts[1]"),
    ("/predict", b'{"inputs": []}', 422, "inputs"),
    ("/predict", b'{"inputs": [["a", "b"]]}', 422, "inputs[0]"),
    ("/predict", b'{"inputs": 5}', 422, "inputs"),
]


@pytest.mark.parametrize("path,body,status,field", BAD)
def test_bad_requests_get_one_json_error(client, path, body, status, field):
    res = client.post(path, content=body, headers={"content-type": "application/json"})
    assert res.status_code == status, res.text
    err = res.json()
    assert set(err) == {"error", "field"} and err["field"] == field
    assert err["error"] and "\n" not in err["error"] and "Traceback" not in err["error"]


def test_unknown_paths_and_methods_are_json(client):
    assert client.get("/nope").json() == {"error": "Not Found", "field": None}
    res = client.get("/v1/classify")
    assert res.status_code == 405 and res.json()["field"] is None


def test_full_queue_answers_503_with_retry_after(tiny_run, clf):
    with serving(tiny_run, clf, backend="torch", max_queue=2) as c:
        res = c.post("/v1/classify", json={"texts": SAMPLE_TEXTS[:3]})
        assert res.status_code == 503 and res.headers["retry-after"] == "1"
        assert "busy" in res.json()["error"]
        assert c.post("/v1/classify", json={"texts": SAMPLE_TEXTS[:2]}).status_code == 200


def test_concurrent_requests_share_batches_and_get_their_own_answers(tiny_run, clf):
    texts = [f"{t} number {i}" for i in range(4) for t in SAMPLE_TEXTS]  # 16 different texts
    expected = clf.predict_proba(texts)
    with serving(tiny_run, clf, backend="torch", max_wait_ms=300, max_batch_size=64) as c:
        before = metric(c, "lorafit_batches_total")
        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(lambda t: c.post("/v1/classify", json={"texts": [t]}), texts))
        batches = metric(c, "lorafit_batches_total") - before
    for res, text, probs in zip(answers, texts, expected):
        assert res.status_code == 200
        got = res.json()["results"][0]["probabilities"]
        np.testing.assert_allclose([got[n] for n in clf.classes_], probs, atol=1e-5, err_msg=text)
    assert 1 <= batches < len(texts), f"{batches} batches for {len(texts)} concurrent requests"


def test_api_key_guards_everything_but_health(tiny_run, clf):
    with serving(tiny_run, clf, backend="torch", api_key="s3cret") as c:
        body = {"texts": SAMPLE_TEXTS[:1]}
        denied = c.post("/v1/classify", json=body)
        assert denied.status_code == 401 and denied.json()["field"] is None
        assert denied.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/classify", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/classify", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/predict", json={"inputs": "x y"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        for path in ("/v1/model", "/metrics", "/docs", "/openapi.json"):
            assert c.get(path).status_code == 401, path
        for path in ("/healthz", "/readyz", "/"):
            assert c.get(path).status_code == 200, path


def test_cli_refuses_a_bad_run_or_backend_before_listening(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from lorafit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["serve", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a lorafit run directory" in res.output
    res = runner.invoke(app, ["serve", str(tiny_run), "--backend", "tensorrt"])
    assert res.exit_code == 2 and "--backend tensorrt: Input should be 'auto', 'torch', 'onnx' or 'onnx-int8'" in res.output
