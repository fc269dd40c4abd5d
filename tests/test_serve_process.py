"""`lorafit serve` as a real process on a free loopback port: SIGTERM drains in-flight requests and exits 0, the
API key from LORAFIT_API_KEY, and the page at / driven in Debian's chromium through Playwright (fails, never
skips, when chromium is missing: `make test` installs it first, scripts/install-test-services)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import lorafit

from conftest import SAMPLE_TEXTS

CHROMIUM = os.environ.get("LORAFIT_CHROMIUM", "/usr/bin/chromium")  # the one scripts/install-test-services checks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def lorafit_serve(run: Path, *args: str, env: dict | None = None, headers: dict | None = None):
    """`python -m lorafit.cli serve RUN` on a free port; yields (process, base url) once /readyz answers 200."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorafit.cli", "serve", str(run), "--port", str(port), *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"lorafit serve exited with {proc.returncode}:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "lorafit serve not ready after 180 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_run):
    """One `lorafit serve` process for this module (start-up dominates the time); the SIGTERM test, last, ends it.
    A long batching wait keeps requests in flight (queued) when SIGTERM arrives; the key comes from the environment."""
    with lorafit_serve(tiny_run, "--backend", "torch", "--max-wait-ms", "4000", "--max-batch-size", "256",
                       env={"LORAFIT_API_KEY": KEY}) as (proc, url):
        yield proc, url


def test_page_in_chromium(server, tiny_run, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: run scripts/install-test-services (make test does)"
    _, url = server
    text = SAMPLE_TEXTS[1]
    clf = lorafit.load(tiny_run, backend="torch")
    expected = clf.predict_proba([text])[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 720})
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
            page.goto(url + "/")
            page.wait_for_selector("#key-row", state="visible")  # /v1/model answered 401: the page asks for the key
            page.fill("#key", KEY)
            page.fill("#text", text)
            page.click("#classify")
            page.wait_for_selector("#bars .bar-row", timeout=30_000)
            page.wait_for_selector("#summary b")  # the run summary, fetched again with the key
            summary = page.inner_text("#summary")
            assert "test accuracy" in summary and "lora" in summary and "torch" in summary
            rows = page.query_selector_all("#bars .bar-row")
            assert len(rows) == len(clf.classes_)
            shown = {r.get_attribute("data-label"): float(r.get_attribute("data-probability")) for r in rows}
            assert page.inner_text("#label") == clf.classes_[expected.argmax()] == rows[0].get_attribute("data-label")
            for name, prob in zip(clf.classes_, expected):
                assert shown[name] == pytest.approx(float(prob), abs=1e-5)
            widths = page.eval_on_selector_all("#bars .bar-fill", "els => els.map(e => e.getBoundingClientRect().width)")
            track = page.eval_on_selector("#bars .bar-track", "e => e.getBoundingClientRect().width")
            assert widths == sorted(widths, reverse=True) and widths[0] == pytest.approx(track * expected.max(), abs=2)
            assert not page.is_visible("#error") and not outside  # no CDN, no external asset: works offline
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "serve_page.png").stat().st_size > 10_000


def test_sigterm_drains_in_flight_requests_and_exits_0(server):
    proc, url = server
    assert httpx.post(f"{url}/v1/classify", json={"texts": ["x"]}).status_code == 401  # key from LORAFIT_API_KEY
    bodies = [{"texts": [f"{t} ({i})" for t in SAMPLE_TEXTS]} for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        pending = [pool.submit(httpx.post, f"{url}/v1/classify", json=b, headers=AUTH, timeout=60) for b in bodies]
        deadline = time.monotonic() + 20
        while True:  # every text queued, none answered yet
            metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
            if float(re.search(r"^lorafit_queue_depth (\S+)$", metrics, re.M).group(1)) == 6 * len(SAMPLE_TEXTS):
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.02)
        assert not any(f.done() for f in pending)
        proc.send_signal(signal.SIGTERM)
        answers = [f.result() for f in pending]
    assert [a.status_code for a in answers] == [200] * len(bodies)
    assert all(len(a.json()["results"]) == len(SAMPLE_TEXTS) for a in answers)
    assert proc.wait(timeout=60) == 0, proc.stdout.read()
    out = proc.stdout.read()
    assert "serving" in out and "torch backend" in out and "Traceback" not in out
