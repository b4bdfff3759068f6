"""The HTML pages (retrieve.py query's index.html, test.py --html's report.html) opened in headless
Chromium: every picture exists beside the page, loads, has an alt text and a caption, and the
console holds no error. Chromium is Debian's (`.ci/run` installs it)."""
import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import retrieve
import test as test_program
from test_retrieve import index_argv, trained  # noqa: F401  (the trained fixture)
from test_train import phantoms  # noqa: F401  (the phantoms fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def open_in_chromium(page, screenshot=None):
    """(pictures, pictures loaded, [alt texts], [console errors and page errors]) of `page`."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("needs chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    errors = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            tab = browser.new_page(viewport={"width": 1300, "height": 900})
            tab.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
            tab.goto(Path(page).resolve().as_uri())
            tab.wait_for_load_state("load")
            state = tab.evaluate("() => Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, "
                                 "i.alt, !!i.closest('figure')?.querySelector('figcaption')])")
            if screenshot:
                tab.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return len(state), sum(loaded for loaded, _, _ in state), [alt for _, alt, _ in state], \
        all(captioned for _, _, captioned in state), errors


def relative_pictures(page):
    sources = re.findall(r'<img src="([^"]+)"', Path(page).read_text())
    assert all(not s.startswith(("/", "http", "file:")) for s in sources)  # the folder can be zipped and mailed
    assert all((Path(page).parent / s).is_file() for s in sources)
    return sources


def test_retrieval_page_of_three_films_with_heat_maps(trained, phantoms, tmp_path):  # noqa: F811
    index = tmp_path / "idx"
    retrieve.main(index_argv(trained, phantoms, index))
    three = tmp_path / "three.txt"
    three.write_text("".join((phantoms / "test_split.txt").read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "query"
    retrieve.main(["query", "--index", str(index), "--resume", str(trained), "--image-list", str(three),
                   "--dataset-dir", str(phantoms / "test"), "--topk", "5", "--explain", "--out", str(out),
                   "--mask-dir", str(phantoms / "masks"), "--device", "cpu"])
    page = out / "index.html"
    sources = relative_pictures(page)
    assert len(sources) == 3 * 6  # each query: the film and its 5 neighbours
    pictures, loaded, alts, captioned, errors = open_in_chromium(page)
    assert pictures == loaded == 18 and captioned and all(alts) and errors == []
    text = page.read_text()
    assert text.count("<h2>Query ") == 3 and "similarity" in text and ("right" in text or "wrong" in text)
    # the ontology's sentences, read from each query's map with its masks (so the CTR rules could run)
    queries = json.loads((out / "results.json").read_text())["queries"]
    for record in queries:
        assert record["sentences"][0].startswith(f"Retrieved finding: {record['vote']}")
        assert html.escape(record["sentences"][0], quote=True) in text
    assert any("cardiothoracic ratio" in sentence for r in queries for sentence in r["sentences"])


def test_report_page_with_intervals_figures_and_the_lowest_ap_queries(trained, phantoms, tmp_path):  # noqa: F811
    report = tmp_path / "report.json"
    test_program.main(test_program.get_args_parser().parse_args([
        "--resume", str(trained), "--test-dataset-dir", str(phantoms / "test"), "--test-image-list",
        str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu", "--report", str(report),
        "--bootstrap", "50", "--html"]))
    page = tmp_path / "report.html"
    sources = relative_pictures(page)
    assert {"report_confusion.png", "report_embedding_map.png", "report_risk_coverage.png"} <= set(sources)
    assert len([s for s in sources if s.startswith("report_html/")]) == 5 * 6  # 5 lowest-AP queries, 5 neighbours
    pictures, loaded, alts, captioned, errors = open_in_chromium(page)
    assert pictures == loaded == len(sources) and captioned and all(alts) and errors == []
    text = page.read_text()
    assert "95% interval" in text and re.search(r"\[\d+\.\d, \d+\.\d\]", text) and "Per class" in text
