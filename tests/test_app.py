"""The teachers' grading page (gemma_lowmem/app.py, scripts/app.py).

Fast: the page's checks and rendering without a server (the warning on every untrained result, the limits, the
column mapping, one grading at a time, a class set's bad rows and download name). Slow (they run the script end to
end): ``scripts/app.py`` started on 127.0.0.1 with a tiny random model and driven through Gradio's HTTP API (one
summary, bad input, a file with a bad row and the download's content, a second upload while one grades), then
headless Chromium from the OS packages, driven over the DevTools protocol on a pipe (no driver, no download), opens
the page, types an article and a summary, presses grade, sees the scores and saves a screenshot.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gemma_lowmem.app import (
    MAX_ARTICLE_CHARS,
    Busy,
    Grader,
    OneAtATime,
    check_texts,
    grade_class_set,
    grade_html,
    grade_one,
    parse_columns,
    say,
)
from tests.fake_grades import ARTICLE, fake_grades

ROOT = Path(__file__).resolve().parents[1]
UNTRAINED_KO = "채점용으로 학습되지 않은 기본 모델"


def _grader(adapter=None, fake=True) -> Grader:
    grader = Grader(model=None, tokenizer=None, model_name="tiny", adapter=adapter)
    if fake:
        grader.grade_rows = fake_grades  # the page's logic alone; the slow tests grade for real
    return grader


# ------------------------------------------------------------------------------------------------- fast, no server


def test_every_result_of_an_untrained_model_carries_the_warning():
    (g,) = fake_grades([{"id": "x"}])
    assert UNTRAINED_KO in grade_html(g, _grader(), "ko")
    assert "not trained as a judge" in grade_html(g, _grader(), "en")
    trained = grade_html(g, _grader(adapter="runs/x/adapter"), "ko")
    assert UNTRAINED_KO not in trained and 'id="gl-total">50<' in trained and "runs/x/adapter" in trained


def test_model_text_is_escaped():
    (g,) = fake_grades([{"id": "x"}])
    g.feedback = "<script>alert(1)</script>"
    assert "<script>" not in grade_html(g, _grader(), "en") and "&lt;script&gt;" in grade_html(g, _grader(), "en")


def test_form_limits_name_the_problem():
    assert check_texts("", "s", None, "ko") == say("ko", "err_no_article")
    assert check_texts("   \n", "s", None, "en") == "Paste the article."
    message = check_texts("x" * 100_000, "s", None, "en")
    assert "article is too long: 100,000 characters" in message and f"{MAX_ARTICLE_CHARS:,}" in message
    assert "summary is too long" in check_texts(ARTICLE, "s" * 6000, None, "en")
    assert check_texts(ARTICLE, "", None, "ko") is None  # an empty summary is graded (it scores low)


def test_column_mapping_reads_like_grade_py_columns():
    assert parse_columns("") == {} and parse_columns(None) == {}
    assert parse_columns("article=text summary=student_summary") == {"article": "text", "summary": "student_summary"}
    assert parse_columns("article=본문, summary=학생 요약\nid = 번호") == {"article": "본문", "summary": "학생 요약",
                                                                     "id": "번호"}
    for bad in ("article", "article=", "=text", "article=a article=b", "text article=a"):
        assert parse_columns(bad) is None, bad


def test_one_grading_at_a_time_and_the_second_is_told_at_once():
    turn = OneAtATime()
    with turn.turn():
        with pytest.raises(Busy), turn.turn():
            pass
        status, result = grade_one(_grader(), turn, ARTICLE, "S.", "", "ko")
        assert status == f"⏳ {say('ko', 'err_busy')}" and result == ""
    status, result = grade_one(_grader(), turn, ARTICLE, "S.", "", "ko")  # free again
    assert 'id="gl-total">50<' in result


def test_a_class_set_lists_bad_rows_and_names_an_untrained_download(tmp_path):
    src = tmp_path / "class.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["student", "text", "summary"], ["kim", ARTICLE, "A."], ["lee", "", "B."]])
    seen = []
    status, table, download, bad = grade_class_set(_grader(), OneAtATime(), tmp_path / "work", str(src),
                                                   "article=text id=student", "en",
                                                   lambda *a, **k: seen.append(a[0]))
    assert UNTRAINED_KO not in status and "not trained as a judge" in status and "Graded 1 rows" in status
    assert Path(download).name == "class-graded-UNTRAINED.csv" and list(table["id"]) == ["kim"]
    assert bad == "1 rows skipped (the others are graded):\n- class.csv: row 2: field 'article' is empty"
    assert seen[-1] == (1, 1)
    with open(download, encoding="utf-8") as f:
        assert [(r["student"], r["total"]) for r in csv.DictReader(f)] == [("kim", "50")]
    _, _, trained, _ = grade_class_set(_grader("a"), OneAtATime(), tmp_path / "work", str(src), "article=text", "en")
    assert Path(trained).name == "class-graded.csv"


def test_a_class_set_that_cannot_be_graded_says_why(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello", encoding="utf-8")
    teacher = tmp_path / "teacher.csv"
    with open(teacher, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text", "summary"], [ARTICLE, "A."]])
    grader, turn, work = _grader(), OneAtATime(), tmp_path / "work"
    cases = [(None, "", "파일을 올리세요"), (str(notes), "", "'.txt' 파일은 읽을 수 없습니다"),
             (str(teacher), "article", "열 이름 대응을 읽을 수 없습니다"),
             (str(teacher), "", "teacher.csv: row 1: missing field 'article' (fields present: text, summary); "
                                "if your data calls it otherwise, map it: [열 이름 대응 (선택)] article=YOUR_COLUMN"),
             (str(teacher), "artcle=text", "reads no such field")]
    for upload, columns, needle in cases:
        status, table, download, bad = grade_class_set(grader, turn, work, upload, columns, "ko")
        assert status.startswith("⚠️") and needle in status and download is None, status
        assert str(tmp_path) not in status  # the upload's temporary path is not the teacher's business


def test_script_help_imports_no_torch_and_flags_are_checked_first(monkeypatch):
    shown = subprocess.run([sys.executable, "-X", "importtime", "scripts/app.py", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "Examples:" in shown.stdout
    for flag in ("--adapter", "--model", "--max-mem", "--mode", "--host", "--port", "--share", "--lang {ko,en}"):
        assert flag in shown.stdout, flag
    imported = {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "gradio"}

    from gemma_lowmem.errors import UserError
    from scripts.app import main

    with pytest.raises(UserError, match="--port 70000 is not a port"):
        main(["--port", "70000"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "gradio" else object())
    with pytest.raises(UserError, match=r'the page needs Gradio: pip install -e "\.\[app\]"'):
        main([])


# ------------------------------------------------------------------------------- slow: the server, then a browser

gradio_missing = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("gradio", "gradio_client")),
    reason="gradio is not installed: pip install -e '.[app]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``scripts/app.py`` on 127.0.0.1 with a tiny random Gemma and no adapter; stopped after the module."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(log.parent))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "scripts/app.py", "--model", str(tiny_model_dir), "--port", str(port),
                                 "--batch-size", "2"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"scripts/app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the page did not come up in 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server, verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.mark.slow
@gradio_missing
def test_api_grades_one_summary_with_the_warning_and_keeps_serving_after_bad_input(client):
    status, result = client.predict(ARTICLE, "A library opened.", "", "ko", api_name="/grade_one")
    assert status == "" and UNTRAINED_KO in result and 'id="gl-total">' in result
    assert result.count('data-criterion="') == 4 and "총점" in result
    for args, needle in [(("", "s", "", "ko"), "기사를 입력하세요"),
                         (("x" * 100_000, "s", "", "en"), "too long: 100,000"),
                         ((ARTICLE, "s" * 100_000, "", "en"), "summary is too long")]:
        status, result = client.predict(*args, api_name="/grade_one")
        assert needle in status and result == ""
    status, result = client.predict(ARTICLE, "", "A new library opened.", "en", api_name="/grade_one")
    assert "not trained as a judge" in result and "Total" in result  # still serving, in English


def _write_class_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["student", "text", "summary"], *rows])


@pytest.mark.slow
@gradio_missing
def test_api_grades_a_file_with_a_bad_row_and_the_download_has_the_graded_rows(client, tmp_path):
    from gradio_client import handle_file

    src = tmp_path / "class.csv"
    _write_class_csv(src, [["kim", ARTICLE, "A library opened."], ["lee", "", "No article."],
                           ["park", ARTICLE, ""]])
    status, table, download, bad = client.predict(handle_file(str(src)), "article=text id=student", "ko",
                                                  api_name="/grade_file")
    assert UNTRAINED_KO in status and "2행을 채점했습니다" in status
    assert bad == "건너뛴 행 1개 (나머지는 채점했습니다):\n- class.csv: row 2: field 'article' is empty"
    assert [row[0] for row in table["data"]] == ["kim", "park"] and "총점" in table["headers"]
    assert Path(download).name == "class-graded-UNTRAINED.csv"
    with open(download, encoding="utf-8") as f:
        graded = list(csv.DictReader(f))
    assert [(r["student"], r["text"], r["summary"]) for r in graded] == [("kim", ARTICLE, "A library opened."),
                                                                          ("park", ARTICLE, "")]
    for r, shown in zip(graded, table["data"]):
        assert int(r["total"]) == shown[2] == sum(int(r[k]) for k in ("coverage", "accuracy", "conciseness",
                                                                      "grammar"))
        assert r["mode"] == "guided" and r["valid"] == "True" and r["answer"]


@pytest.mark.slow
@gradio_missing
def test_api_grades_an_xlsx_file_into_xlsx(client, tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    from gradio_client import handle_file

    src = tmp_path / "반 명단.xlsx"
    book = openpyxl.Workbook()
    book.active.append(["article", "summary"])
    book.active.append([ARTICLE, "A library opened."])
    book.save(src)
    status, table, download, bad = client.predict(handle_file(str(src)), "", "en", api_name="/grade_file")
    assert "Graded 1 rows" in status and bad == "" and Path(download).suffix == ".xlsx"
    rows = list(openpyxl.load_workbook(download).worksheets[0].iter_rows(values_only=True))
    header, values = rows[0], rows[1]
    assert dict(zip(header, values))["total"] == table["data"][0][2] and dict(zip(header, values))["id"] == "row-1"


@pytest.mark.slow
@gradio_missing
def test_api_bad_files_are_messages(client, tmp_path):
    from gradio_client import handle_file

    notes = tmp_path / "notes.txt"
    notes.write_text("not a class set", encoding="utf-8")
    teacher = tmp_path / "teacher.csv"
    _write_class_csv(teacher, [["kim", ARTICLE, "A."]])
    for args, needle in [((handle_file(str(notes)), "", "en"), "Cannot read a '.txt' file"),
                         ((handle_file(str(teacher)), "", "en"), "missing field 'article' (fields present: student, "
                                                                 "text, summary)"),
                         ((None, "", "en"), "Upload a file")]:
        status, table, download, bad = client.predict(*args, api_name="/grade_file")
        assert needle in status and download is None, status


@pytest.mark.slow
@gradio_missing
def test_api_a_second_upload_while_one_grades_is_told_to_wait(client, tmp_path):
    from gradio_client import handle_file

    src = tmp_path / "class.csv"
    _write_class_csv(src, [[f"s{i}", ARTICLE, "A library opened."] for i in range(3)])
    first = client.submit(handle_file(str(src)), "article=text id=student", "en", api_name="/grade_file")
    deadline = time.monotonic() + 60
    while not any(s.code.name == "PROGRESS" or s.progress_data for s in [first.status()]):  # it holds the model
        assert time.monotonic() < deadline and not first.done()
        time.sleep(0.05)
    second = client.submit(handle_file(str(src)), "article=text id=student", "en", api_name="/grade_file")
    results = [job.result(timeout=300) for job in (first, second)]
    busy = [r for r in results if "Another grading is running" in r[0]]
    graded = [r for r in results if "Graded 3 rows" in r[0]]
    assert len(busy) == len(graded) == 1 and busy[0][2] is None and graded[0][2] is not None
    status, _ = client.predict(ARTICLE, "A.", "", "en", api_name="/grade_one")  # free again
    assert status == ""


# ----------------------------------------------------------------------------------------------- a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chromium-headless-shell"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class DevTools:
    """Headless Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: the browser reads
    commands on fd 3 and writes replies on fd 4, each a JSON message ending in NUL)."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire() -> None:  # in the child: its fd 3 and 4 become the pipe's ends
            read_end, write_end = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1280,1400", "about:blank"],
                pass_fds=(3, 4), preexec_fn=wire, stdout=out, stderr=subprocess.STDOUT)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id, self._buffer, self.session = 0, b"", None

    def send(self, method: str, timeout: float = 60, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0, f"no reply to {method} in {timeout} s"
            if select.select([self._from_browser], [], [], left)[0]:
                chunk = os.read(self._from_browser, 1 << 20)
                assert chunk, "the browser closed its pipe"
                self._buffer += chunk

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def js(self, expression: str):
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.25)
        return value

    def type_into(self, selector: str, value: str) -> None:
        """Focus the field, select what it holds and type over it (input events the page's framework sees)."""
        self.js(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.focus(); el.select(); }})()")
        self.send("Input.insertText", text=value)

    def click(self, element: str) -> None:
        """A real mouse press and release on the centre of ``element`` (a JavaScript expression)."""
        box = self.js(f"(() => {{ const el = {element}; el.scrollIntoView();"
                      " const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (AssertionError, OSError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.mark.slow
@gradio_missing
@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_a_browser_fills_the_form_presses_grade_and_sees_the_scores(server, tmp_path):
    browser = DevTools(_chromium(), tmp_path / "profile", tmp_path / "chromium.log")
    try:
        browser.open(server)
        browser.wait_for("!!document.querySelector('#gl-article textarea')", timeout=60)
        assert UNTRAINED_KO in browser.js("document.body.innerText")  # the banner, before any grade
        browser.type_into("#gl-article textarea", "가" * 100_000)  # a paste that is no article
        browser.click("document.querySelector('#gl-grade')")
        browser.wait_for("document.querySelector('#gl-status-one').innerText.includes('100,000자')", timeout=60)
        browser.type_into("#gl-article textarea", ARTICLE)
        browser.type_into("#gl-summary textarea", "새 도서관이 월요일에 문을 열었다. 책이 2만 권 있다.")
        browser.click("document.querySelector('#gl-grade')")
        total = browser.wait_for("document.querySelector('#gl-total')?.innerText", timeout=180)
        scores = browser.js("[...document.querySelectorAll('#gl-result td.gl-score b')].map(b => b.innerText)")
        assert len(scores) == 4 and int(total) == sum(int(s) for s in scores)
        assert UNTRAINED_KO in browser.js("document.querySelector('#gl-result').innerText")
        browser.send("Emulation.setDeviceMetricsOverride", width=1280, height=1400, deviceScaleFactor=1, mobile=False)
        shot = tmp_path / "grading-page.png"
        browser.screenshot(shot)
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000

        browser.click("[...document.querySelectorAll('#gl-lang label')].find(l => l.innerText.includes('English'))")
        browser.wait_for("document.querySelector('#gl-header').innerText.includes('Summary grading')", timeout=30)
        assert browser.js("document.querySelector('#gl-grade').innerText").strip() == "Grade"
        assert "not trained as a judge" in browser.js("document.querySelector('#gl-banner').innerText")
    finally:
        browser.close()
