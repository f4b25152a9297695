"""Issue 15: the gallery shows each run's metrics, their trend (an inline SVG drawn on the
server, checked in headless Chromium) and switches between visual and hybrid neighbours."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.integration.test_evaluation import _catalogue_in, _clustered_catalogue, _features_for
from tools.object_store import free_port

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, list[str]]:
    """Three evaluated and loaded runs (the second's features carry no picture: forced in)."""
    from recsketch.config import Settings
    from recsketch.stages import hybrid_stage, similarity_stage
    from recsketch.stages.common import run_dir
    from recsketch.stages.evaluate import evaluate_stage
    from recsketch.stages.load import load_stage
    from recsketch.stages.threshold import threshold_stage

    tmp = tmp_path_factory.mktemp("gallery")
    frame, mids, unit = _clustered_catalogue(groups=20, per_group=10, users=300)
    good = Settings(data_dir=tmp / "data", database_url=f"sqlite:///{tmp / 'recs.sqlite'}", top_k=5)
    broken = good.with_overrides(lite0_precision="bfloat16")
    _catalogue_in(good, frame, mids)
    _features_for(good, mids, unit)
    _features_for(broken, mids, np.random.default_rng(9).standard_normal(unit.shape).astype(np.float32))
    for run_id, settings in (("run-1", good), ("run-2", broken), ("run-3", good)):
        folder = run_dir(settings, run_id)
        threshold_stage(settings, folder)
        similarity_stage(settings, folder)
        evaluate_stage(settings, folder)
        hybrid_stage(settings, folder)
        load_stage(settings, folder, run_id, force=True)
    return good, mids


@pytest.fixture(scope="module")
def gallery_url(measured: tuple[object, list[str]]) -> Iterator[str]:
    import uvicorn

    from recsketch.gallery import create_app

    settings, _ = measured
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(lambda: settings, authenticate=lambda: None),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(url + "/api/metrics", timeout=2)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(10)


def test_metrics_and_methods_over_http(gallery_url: str, measured: tuple[object, list[str]]) -> None:
    _, mids = measured
    history = requests.get(gallery_url + "/api/metrics", timeout=10).json()
    assert [run["run_id"] for run in history] == ["run-1", "run-2", "run-3"]
    ndcg = [run["metrics"]["warm/visual/ndcg@10"] for run in history]
    assert ndcg[1] < 0.5 * ndcg[0] and ndcg[2] == pytest.approx(ndcg[0])  # the broken run shows as a dip
    visual = requests.get(f"{gallery_url}/api/similar/{mids[0]}?top_k=5", timeout=10).json()
    hybrid = requests.get(f"{gallery_url}/api/similar/{mids[0]}?top_k=5&method=hybrid", timeout=10).json()
    assert len(visual) == len(hybrid) == 5 and visual != hybrid
    assert requests.get(f"{gallery_url}/api/similar/{mids[0]}?method=other", timeout=10).status_code == 422
    page = requests.get(gallery_url + "/", timeout=10).text
    assert '<svg class="trend"' in page and 'data-method="visual"' in page and "run-3</code> (live)" in page


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="Debian chromium + chromium-driver needed")
def test_trend_chart_and_method_switch_in_chromium(gallery_url: str, measured: tuple[object, list[str]],
                                                   tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, mids = measured
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(gallery_url + "/")
        series = driver.execute_script(
            "return [...document.querySelectorAll('svg.trend polyline.series')].map(p => "
            "[p.dataset.method, p.points.numberOfItems, p.getBBox().width, p.getBBox().height])")
        rows = driver.execute_script("return [...document.querySelectorAll('table.metrics tr[data-run]')]"
                                     ".map(r => [r.dataset.run, r.className])")
        driver.save_screenshot(str(tmp_path / "quality.png"))
        box = driver.find_element(By.NAME, "q")
        box.send_keys(mids[0])
        Select(driver.find_element(By.NAME, "method")).select_by_value("hybrid")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "figure.rec"))
        heading = driver.find_element(By.CSS_SELECTOR, "h2[data-method]").get_attribute("data-method")
        links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "figure.rec figcaption a")]
    finally:
        driver.quit()
    by_method = {method: (points, width, height) for method, points, width, height in series}
    assert set(by_method) == {"visual", "hybrid", "cf", "popularity"}
    assert all(points == 3 and width > 300 and height > 0 for points, width, height in
               (by_method["visual"], by_method["hybrid"]))  # three runs, drawn across the chart, with the dip
    assert rows == [["run-3", "live"], ["run-2", ""], ["run-1", ""]]
    browsing = [link for link in links if link.startswith(gallery_url)]  # not the Sketchfab links
    assert heading == "hybrid" and len(browsing) == 5 and all("method=hybrid" in link for link in browsing)
    assert (tmp_path / "quality.png").stat().st_size > 10_000
