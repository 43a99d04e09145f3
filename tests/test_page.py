"""Issue 22: the night as a page. The data it is built from (a night of the test suite's driver),
its safety (text a model or train.py wrote never becomes markup), `report --html` / `--serve`, and
a real browser (Debian's headless Chromium, through Selenium and Debian's chromedriver) opening it
from disk and from the server: no console error, one row per experiment, an experiment's diff on
demand, and a served page that follows the night."""

import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from autoresearch import cli, page, records
from driver_helpers import BASE_LINE, MODE_LINE, fake, git, repo, rows, run  # noqa: F401
from fake_anthropic import edit

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NASTY = "</script><script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"


@pytest.fixture
def night(repo, fake):
    """A night of three ideas after the baseline (greedy): a keep with a hypothesis, theme and lesson,
    a crash, and a discard whose description is markup; the page written by the driver."""
    fake.replies += [
        edit("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000"), hypothesis="a lower value wins", theme="optimizer"),
        edit("crashes", (MODE_LINE, 'MODE = "crash"'), hypothesis="it will not run", theme="architecture",
             lessons=[(1, "lower was better")]),
        edit(f"worse {NASTY}", ("TRUE_BPB = 0.990000", "TRUE_BPB = 0.995000"), hypothesis=NASTY, theme="optimizer"),
    ]
    assert run("--max-experiments", "3", "--greedy", "--fix-attempts", "0") == 0
    return repo


def test_every_decided_experiment_leaves_the_record_the_page_is_built_from(night):
    data = page.page_data(night / "runs/t", night / "results.tsv")
    exps = {e["n"]: e for e in data["experiments"]}
    assert sorted(exps) == [0, 1, 2, 3]
    assert [exps[n]["status"] for n in range(4)] == ["keep", "keep", "crash", "discard"]
    keep = exps[1]
    assert (keep["theme"], keep["hypothesis"], keep["lesson"]) == ("optimizer", "a lower value wins", "lower was better")
    assert keep["mean"] == pytest.approx(0.99) and keep["delta"] == pytest.approx(-0.01)
    assert "-TRUE_BPB = 1.000000" in keep["diff"] and "+TRUE_BPB = 0.990000" in keep["diff"]
    assert keep["parent"] == exps[0]["commit"] and keep["commit"] != exps[0]["commit"]
    assert keep["decision"].startswith("keep: mean 0.990000 over 1 run(s); its parent (the best when it ran) "
                                       "1.000000 over 1 run(s), a difference of -0.010000; rule: greedy, kept if lower")
    assert keep["runs"][0]["curve"] == [[s, pytest.approx(0.99 * (5 - s))] for s in range(5)]  # from the log
    crash = exps[2]
    assert crash["decision"].startswith("crash: no val_bpb") and "stand-in crash" in crash["runs"][0]["tail"]
    assert exps[3]["delta"] == pytest.approx(0.005) and exps[3]["usd"] > 0
    # every results.tsv row is a point of the chart, linked to its experiment
    assert [p["n"] for p in data["points"]] == [0, 1, 2, 3] and len(data["points"]) == len(rows(night))
    assert [t["n"] for t in data["timeline"]] == [0, 1, 2, 3] and {t["slot"] for t in data["timeline"]} == {"gpu"}
    assert data["summary"]["experiments"] == 3 and "## optimizer" in data["notes"]


def test_the_page_is_whole_self_contained_and_escapes_what_models_wrote(night):
    html = (night / "runs/t/report/index.html").read_text()  # written by the driver at its last decision
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert NASTY not in html and "<img src=x" not in html and html.count("</script>") == 2  # its own two only
    for remote in ("http://", "https://", "//cdn", "@import", "url("):
        assert remote not in html.replace('const SVG = "http://www.w3.org/2000/svg"', ""), remote
    data = json.loads(html.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert [e["n"] for e in data["experiments"]] == [0, 1, 2, 3]
    stamp = (night / "runs/t/report/stamp.txt").read_text()
    page.write(night / "runs/t", night / "results.tsv")
    assert (night / "runs/t/report/stamp.txt").read_text() != stamp  # what a served page watches
    assert not list((night / "runs/t/report").glob("*.tmp"))


def test_loss_curves_are_read_from_the_progress_lines_and_thinned(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("".join(f"\rstep {s:05d} ({s / 10:.1f}%) | loss: {10 - s / 100:.6f} | lrm: 1.00" for s in range(1000)))
    curve = page.loss_curve(log)
    assert len(curve) <= page.CURVE_POINTS + 1 and curve[0] == [0, 10.0] and curve[-1] == [999, pytest.approx(0.01)]
    assert page.loss_curve(tmp_path / "missing.log") == []


def test_what_a_run_printed_or_an_old_record_holds_never_breaks_the_page_or_the_night(repo, fake, monkeypatch,
                                                                                      capsys, tmp_path):
    """A progress line with a number that is no float, an infinite loss, a record from another version
    or a damaged one: the page is still written; a record that cannot be written is a note."""
    log = tmp_path / "weird.log"
    log.write_text("\rstep 00001 (1.0%) | loss: 1.2.3 |\rstep 00002 (2.0%) | loss: 1e999 |\rstep 00003 (3.0%) | loss: 2.5 |")
    assert page.loss_curve(log) == [[1, 1.2], [3, 2.5]]
    monkeypatch.setattr(page, "loss_curve", lambda path: 1 / 0)  # whatever goes wrong in a record
    fake.replies += [edit("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "1", "--greedy") == 0  # the night went on
    assert "note: experiment 1's record for the page was not written: ZeroDivisionError" in capsys.readouterr().out
    run_dir = repo / "runs/t"
    (run_dir / "0007").mkdir()
    (run_dir / "0007/experiment.json").write_text('["not", "a record"]')
    (run_dir / "0008").mkdir()
    (run_dir / "0008/experiment.json").write_text('{"n": 8, "description": "from an older driver"}')
    (run_dir / "0009").mkdir()
    (run_dir / "0009/experiment.json").write_text('{"n": 9, "runs": [{"curve": [[0, 1.0]]}], "mea')  # torn
    data = page.page_data(run_dir, repo / "results.tsv")
    assert [e["n"] for e in data["experiments"]] == [8]  # (0, 1: not written; 7, 9: unreadable)
    assert data["experiments"][0]["runs"] == [] and data["experiments"][0]["status"] == ""
    assert page.finite({"a": [float("inf"), 1.0, float("nan")]}) == {"a": [None, 1.0, None]}
    page.write(run_dir, repo / "results.tsv")


def test_two_writers_of_one_page_never_tear_it(tmp_path):
    """The driver and `report --serve` may write the same page at once: each renames a whole file."""
    path, errors = tmp_path / "index.html", []

    def writer(k):
        try:
            for i in range(200):
                records.write_atomic(path, f"{k}" * 50_000)
        except Exception as error:  # noqa: BLE001
            errors.append(error)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        text = path.read_text() if path.exists() else "0" * 50_000
        assert len(text) == 50_000 and len(set(text)) == 1
        seen.add(text[0])
    for t in threads:
        t.join()
    assert errors == [] and not list(tmp_path.glob("*.tmp"))


def test_report_html_and_serve(night, capsys):
    (night / "runs/t/report").rename(night / "runs/t/old-report")
    assert cli.main(["report", "--html"]) == 0
    assert (night / "runs/t/report/index.html").exists() and "wrote " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no journal runs/nope/journal.json; give --journal"):
        cli.main(["report", "--html", "--journal", "runs/nope/journal.json"])
    httpd = page.server(night / "runs/t", night / "results.tsv", port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        host, port = httpd.server_address
        assert host == "127.0.0.1"  # this machine only, by default
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as answer:
            assert answer.status == 200 and b"autoresearch" in answer.read()
            assert answer.headers["Cache-Control"] == "no-store"
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------------------
# A real browser
# ---------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("AUTORESEARCH_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def console_errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def rendered(driver):
    for _ in range(100):
        if driver.execute_script("return window.pageRendered !== undefined"):
            return
        time.sleep(0.1)
    raise AssertionError("the page's script did not finish")


@needs_browser
def test_the_page_opens_from_disk_shows_every_experiment_and_a_diff_on_demand(night, browser, tmp_path):
    from selenium.webdriver.common.by import By
    browser.get((night / "runs/t/report/index.html").as_uri())
    rendered(browser)
    assert console_errors(browser) == []
    assert browser.execute_script("return window.pwned") is None  # the markup in a description stayed text
    table_rows = browser.find_elements(By.CSS_SELECTOR, "#exps tbody tr.exp")
    assert [r.get_attribute("data-n") for r in table_rows] == ["0", "1", "2", "3"]
    assert NASTY in table_rows[3].text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#progress circle.pt")) == 3  # crashes are not drawn
    browser.find_element(By.ID, "exp-1").click()
    added = browser.find_elements(By.CSS_SELECTOR, "tr.detail-row pre.diff div.add")
    assert [d.text for d in added] == ["+TRUE_BPB = 0.990000"]
    assert "rule: greedy" in browser.find_element(By.CSS_SELECTOR, "tr.detail-row .words").text
    assert browser.find_elements(By.CSS_SELECTOR, "tr.detail-row svg.loss polyline")  # its loss, and its parent's
    browser.save_screenshot(str(tmp_path / "page-from-disk.png"))
    browser.find_element(By.ID, "exp-2").click()  # a crash shows the end of its log
    assert "stand-in crash" in browser.find_element(By.CSS_SELECTOR, "tr.detail-row pre.tail").text
    from selenium.webdriver.support.ui import Select
    Select(browser.find_element(By.ID, "f-status")).select_by_visible_text("keep")
    assert [r.get_attribute("data-n") for r in browser.find_elements(By.CSS_SELECTOR, "#exps tbody tr.exp")] == ["0", "1"]
    Select(browser.find_element(By.ID, "f-status")).select_by_visible_text("all")
    browser.find_element(By.CSS_SELECTOR, "#exps th[data-key=mean]").click()  # sorted by val_bpb, crashes last
    assert [r.get_attribute("data-n") for r in browser.find_elements(By.CSS_SELECTOR, "#exps tbody tr.exp")] == \
        ["1", "3", "0", "2"]
    assert console_errors(browser) == []


@needs_browser
def test_the_served_page_follows_the_night(night, browser, monkeypatch, tmp_path):
    """From --serve: it loads, then reloads itself when the driver rewrites it (here: a fourth idea)."""
    from selenium.webdriver.common.by import By
    monkeypatch.setattr(page, "REFRESH_S", 1)
    httpd = page.server(night / "runs/t", night / "results.tsv", port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{httpd.server_address[1]}/#exp-3")
        rendered(browser)
        assert console_errors(browser) == []
        assert browser.find_element(By.ID, "live").text == "· live"
        assert browser.find_elements(By.CSS_SELECTOR, "tr.open#exp-3")  # the hash opens an experiment
        assert len(browser.find_elements(By.CSS_SELECTOR, "#exps tbody tr.exp")) == 4
        browser.find_element(By.CSS_SELECTOR, "#exps th[data-key=n]").click()  # newest first
        browser.find_element(By.ID, "f-text").send_keys("e")  # (every description here has an "e")
        browser.find_element(By.ID, "exp-3").click()
        browser.find_element(By.ID, "exp-3").click()  # (closed and opened again: still open)
        record = json.loads((night / "runs/t/0003/experiment.json").read_text())
        (night / "runs/t/0004").mkdir()
        (night / "runs/t/0004/experiment.json").write_text(json.dumps({**record, "n": 4, "description": "a late one"}))
        page.write(night / "runs/t", night / "results.tsv")
        for _ in range(100):
            if len(browser.find_elements(By.CSS_SELECTOR, "#exps tbody tr.exp")) == 5:
                break
            time.sleep(0.1)
        assert browser.find_element(By.ID, "exp-4").text.count("a late one") == 1
        assert browser.find_elements(By.CSS_SELECTOR, "tr.open#exp-3")  # still open after the reload ...
        assert browser.find_element(By.ID, "f-text").get_attribute("value") == "e"  # ... with its filter and order
        assert [r.get_attribute("data-n") for r in browser.find_elements(By.CSS_SELECTOR, "#exps tbody tr.exp")][:2] \
            == ["4", "3"]
        browser.save_screenshot(str(tmp_path / "page-served.png"))
        assert console_errors(browser) == []
    finally:
        httpd.shutdown()
        httpd.server_close()
