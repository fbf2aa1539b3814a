"""The dashboard in a real headless browser: ``apportion serve``'s app (API keys in SQLite, a dashboard
token, a benchmark run) under uvicorn on 127.0.0.1 over a scripted backend; a few requests, one still
running; then Debian's Chromium (``--headless --no-sandbox``) opens ``/?token=...`` and the test reads
the DOM its JavaScript built and checks a screenshot. Skipped, saying why, where Chromium is not
installed (``apt-get install chromium``; .ci/run does it where it can)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from PIL import Image

from apportion.budget.units import Price
from apportion.lm.base import Completion, Prompt, SamplingParams
from apportion.lm.scripted import ScriptedBackend
from apportion.serve import ServedApp
from apportion.serve.algorithm_app import algorithm_app
from apportion.serve.dashboard import Dashboard, DashboardOptions, with_dashboard
from apportion.serve.keys import KeySpec, open_key_store
from apportion.serve.quota_contract import LazyQuotaStore

FIXTURE_RUN = Path(__file__).resolve().parent.parent / "fixtures" / "report_run"
TOKEN = "dashboard-token-for-the-browser-test"
WIDTH, HEIGHT = 1200, 900
HOSTILE = '<img src=x id=injected onerror="document.title=1">'
"""An algorithm name the server refuses, quoting it in its error: the page must show it as text."""


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium is not installed (apt-get install chromium; browser downloads do not work here)")


@dataclass
class GatedBackend(ScriptedBackend):
    """A scripted backend whose calls for a prompt saying ``hold`` wait until ``release`` is set: a
    request that stays in flight while the browser looks (set from the test's thread)."""

    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)

    async def generate(self, prompt: Prompt, params: SamplingParams, *, deadline: float | None = None) -> Completion:
        if "hold" in (prompt.messages[-1].content if prompt.is_chat else prompt.text or ""):
            self.held.set()
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        return await super().generate(prompt, params, deadline=deadline)


@dataclass
class Served:
    url: str
    key_id: str
    secret: str
    spent_usd: float
    spent_tokens: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    chromium()  # skip before starting anything where there is no browser
    db = tmp_path_factory.mktemp("dashboard") / "keys.db"

    async def create() -> tuple[str, str]:
        store = await open_key_store(db)
        try:
            record, secret = await store.create_key(KeySpec("browser-test"))
            return record.key_id, secret
        finally:
            await store.aclose()

    key_id, secret = asyncio.run(create())
    backend = GatedBackend(["Adding them. The answer is 7."], model="m", price=Price(2.0, 8.0))
    board = Dashboard(DashboardOptions(runs=(FIXTURE_RUN,), token=TOKEN, refresh_s=1.0))
    app = algorithm_app(backend, quota=LazyQuotaStore(lambda: open_key_store(db)), observers=[board.log])
    with ServedApp(with_dashboard(app, board, keys=True)) as server:
        auth = {"Authorization": f"Bearer {secret}"}
        question = [{"role": "user", "content": "What is 3 + 4?"}]
        usd, tokens = 0.0, 0
        with httpx.Client(base_url=server.base_url, headers=auth, timeout=30) as client:
            for body in ({"model": "m", "messages": question, "apportion": {"algorithm": "sc", "budget": 3}},
                         {"model": "m", "messages": question, "apportion": {"algorithm": "best-of-n", "budget": 2}}):
                answer = client.post("/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
                usd += answer.json()["apportion"]["spent"]["usd"]
                tokens += answer.json()["usage"]["total_tokens"]
            refused = client.post("/chat/completions", json={"model": "m", "messages": question,
                                                              "apportion": {"algorithm": HOSTILE}})
            assert refused.status_code == 400
        held = threading.Thread(target=lambda: httpx.post(
            f"{server.base_url}/chat/completions", headers=auth, timeout=60,
            json={"model": "m", "messages": [{"role": "user", "content": "hold on"}],
                  "apportion": {"algorithm": "self-consistency", "budget": 2}}))
        held.start()
        try:
            assert backend.held.wait(10), "the held request never reached the backend"
            yield Served(server.url, key_id, secret, usd, tokens)
        finally:
            backend.release.set()
            held.join(30)


def run_chromium(*args: str, url: str) -> bytes:
    """Headless Chromium on ``url`` with a fresh profile (about 2 s); what it wrote to stdout."""
    with tempfile.TemporaryDirectory(prefix="apportion-chromium-") as profile:
        done = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
             "--hide-scrollbars", "--virtual-time-budget=5000", *args, url],
            capture_output=True, timeout=120, cwd=profile)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout


class Dom(HTMLParser):
    """The text of each table's rows by table id, and the elements' attributes by id."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.attributes: dict[str, dict[str, str | None]] = {}
        self.images: list[dict[str, str | None]] = []
        self._table: str | None = None
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if named.get("id"):
            self.attributes[str(named["id"])] = named
        if tag == "img":
            self.images.append(named)
        if tag == "body":
            self.attributes["body"] = named
        if tag == "table" and named.get("id"):
            self._table = str(named["id"])
            self.rows[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.rows[self._table].append([])
        elif tag == "td" and self._in_body and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            self.rows[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_the_page_shows_requests_spend_and_runs(served: Served) -> None:
    html = run_chromium("--dump-dom", url=f"{served.url}/?token={TOKEN}").decode("utf-8")
    dom = Dom()
    dom.feed(html)

    assert dom.attributes["body"].get("data-ready") == "1", f"the page's script never filled it: {html[:3000]}"
    assert "error" not in (dom.attributes["status"].get("class") or "")
    [running] = dom.rows["in-flight"]
    assert running[1:3] == ["self-consistency", served.key_id]
    recent = dom.rows["recent"]
    assert [r[1] for r in recent] == ["(none)", "best-of-n", "self-consistency"]  # newest first
    assert [r[3] for r in recent] == ["400 refused", "200 ok", "200 ok"]
    assert all(r[2] == served.key_id for r in recent)
    # the refusal quotes the hostile name: shown as text, never made into an element
    assert HOSTILE in recent[0][7]
    assert "injected" not in dom.attributes
    assert {row[0] for row in dom.rows["by-algorithm"]} == {"self-consistency", "best-of-n", "(none)"}
    [by_key] = dom.rows["by-key"]
    assert by_key[:3] == [served.key_id, "3", "2"]  # requests, of which ok
    assert by_key[3] == f"{served.spent_tokens:,}"
    assert by_key[4] == (f"${served.spent_usd:.4f}" if served.spent_usd >= 0.01 else f"${served.spent_usd:.3g}")
    assert served.secret not in html
    # the benchmark run: its plot loaded, and a row per curve
    [plot] = dom.images
    assert plot.get("data-loaded") == "1" and "accuracy against tokens" in (plot.get("alt") or "")
    expected = httpx.get(f"{served.url}/dashboard/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [row[0] for row in dom.rows["run-0-curves"]] == [c["label"] for c in expected["runs"][0]["curves"]]


def test_a_screenshot_of_the_page(served: Served, tmp_path: Path) -> None:
    shot = tmp_path / "dashboard.png"
    run_chromium(f"--screenshot={shot}", url=f"{served.url}/?token={TOKEN}")
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=WIDTH * HEIGHT) or []
    assert len(colours) > 200, f"{len(colours)} colours: the page looks blank"
    assert rgb.getpixel((5, 5)) == (0x1D, 0x35, 0x57), "the header bar is not drawn: the stylesheet was not applied"
    background = max(colours)[0] / (WIDTH * HEIGHT)
    assert background < 0.9, f"one colour covers {background:.0%} of the page"
