"""The operator console in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``,
driven by selenium) against a real ``bentoml serve``. Sign in with the admin token, upload a CSV, train
a small job to completion, see its curve, promote the version, classify in the try-it box.

``.ci/run`` installs the browser when it is missing. Set ``LORAPLEX_CONSOLE_SCREENSHOTS=DIR`` to keep
the screenshots (the README's are made that way)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.service_support import ADMIN, ADMIN_TOKEN, seeded_store, serve_ready, service_env, tenant_auth
from tests.test_jobs_http import csv_bytes
from tests.training_support import toy_rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,1000",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("console")
    seeded_store(tmp / "store", tiny_bert_dir, tmp)
    srv = serve_ready("serving.service:LoraplexService", service_env(str(tmp / "store"), tmp), tmp)
    yield srv
    srv.stop()


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def shot(driver, name: str, tmp_path: Path) -> None:
    path = tmp_path / f"console-{name}.png"
    driver.save_screenshot(str(path))
    keep = os.environ.get("LORAPLEX_CONSOLE_SCREENSHOTS")
    if keep:
        shutil.copy(path, Path(keep) / path.name)


def wait_for(driver, predicate, timeout=180.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate(driver)
            if value:
                return value
        except Exception:  # the page re-renders while we look: try again
            pass
        time.sleep(0.25)
    status = driver.find_element("id", "status").text
    raise AssertionError(f"timed out waiting for {what}; status line: {status!r}")


def test_console_signs_in_trains_promotes_and_classifies(server, browser, tmp_path):
    d, by_id = browser, lambda i: browser.find_element("id", i)
    d.get(server.url + "/console/")
    assert d.title == "loraplex console"
    by_id("token").send_keys("wrong-token")
    by_id("login").click()
    wait_for(d, lambda d: "Sign-in failed" in by_id("status").text, 30, "a refused sign-in")
    by_id("token").clear()
    by_id("token").send_keys(ADMIN_TOKEN)
    by_id("login").click()
    wait_for(d, lambda d: "acme" in by_id("tenants").text, 30, "the tenant list")
    d.find_element("xpath", "//ul[@id='tenants']//button[text()='acme']").click()
    wait_for(d, lambda d: "intent" in by_id("adapters").text, 30, "acme's adapters")

    # Upload a labelled CSV and train a small LoRA job to completion.
    data = tmp_path / "tickets.csv"
    data.write_bytes(csv_bytes(toy_rows(per_class=10)))
    d.find_element("css selector", "nav button[data-view='jobs']").click()
    by_id("job-tenant").send_keys("acme")
    by_id("job-name").send_keys("console-demo")
    by_id("job-epochs").clear()
    by_id("job-epochs").send_keys("2")
    by_id("job-lr").send_keys("0.01")
    by_id("job-file").send_keys(str(data))
    by_id("job-submit").click()
    job_id = wait_for(
        d, lambda d: "queued" in by_id("status").text and by_id("status").text.split()[1], 30, "the job id"
    )
    row = lambda d: d.find_element("id", f"job-{job_id}")  # noqa: E731
    wait_for(d, lambda d: row(d).find_element("class name", "job-status").text == "succeeded", 240, "the job")
    assert "registered v1" in row(d).find_element("class name", "job-result").text
    row(d).find_element("xpath", ".//button[text()='Curve']").click()
    wait_for(
        d,
        lambda d: d.execute_script("return document.getElementById('curve').naturalWidth") > 0,
        30,
        "the curve",
    )
    d.execute_script("document.getElementById('jobs-title').scrollIntoView()")
    shot(d, "jobs", tmp_path)

    # Promote it in the adapters view.
    d.find_element("css selector", "nav button[data-view='adapters']").click()
    wait_for(d, lambda d: "console-demo" in by_id("adapters").text, 30, "the new adapter")
    d.find_element("xpath", "//ul[@id='adapters']//button[text()='console-demo']").click()
    wait_for(d, lambda d: by_id("promote-1"), 30, "version 1").click()
    wait_for(d, lambda d: "production → v1" in by_id("status").text, 30, "the promotion")
    assert "production → 1" in by_id("detail-aliases").text
    shot(d, "adapters", tmp_path)
    aliases = httpx.get(server.url + "/v1/admin/tenants/acme/adapters/console-demo", headers=ADMIN).json()[
        "aliases"
    ]
    assert aliases["production"] == 1

    # The try-it box answers with the promoted version.
    d.find_element("css selector", "nav button[data-view='try']").click()
    by_id("try-tenant").send_keys("acme")
    by_id("try-adapter").send_keys("console-demo")
    by_id("try-text").send_keys("my parcel delivery is late")
    by_id("try-submit").click()
    answer = wait_for(
        d, lambda d: "answered" in by_id("try-result").text and by_id("try-result").text, 60, "an answer"
    )
    assert "acme/console-demo@1 answered" in answer
    assert {"billing", "login", "shipping"} <= {line.split(":")[0] for line in answer.splitlines()[1:]}
    shot(d, "try", tmp_path)

    # Tenants' own traffic shows in the usage table.
    r = httpx.post(
        server.url + "/v1/classify",
        headers=tenant_auth("acme"),
        json={"items": [{"adapter": "console-demo", "text": "reset my password"}]},
    )
    assert r.status_code == 200, r.text
    d.find_element("css selector", "nav button[data-view='cache']").click()
    wait_for(d, lambda d: "acme/console-demo" in by_id("residents").text, 30, "the resident adapters")
    assert "loads" in by_id("cache").text
    assert by_id("usage").find_element("xpath", ".//tr[td[1]='acme']/td[3]").text == "1"  # rows answered
    shot(d, "cache", tmp_path)
