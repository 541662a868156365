"""The dashboard (/ui): in a real browser (headless Chromium through Selenium) against a real `al serve`
with its embedded broker and a key, as after `make run` with AL_API_KEYS: logged in through the key form, its
scripts' writes carry the session's CSRF token, and no page logs a severe console error. The key gate, the
session and the package data without a browser."""

from __future__ import annotations

import base64
import math
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest
from service_support import (
    dashboard_login,
    digits_npz,
    form_token,
    free_port,
    service_env,
    start_server,
    use_env,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
EPOCHS = 3
KEY = "dashboard-admin-key"


def install_chromium() -> str | None:
    """Debian's chromium and chromium-driver, installed when missing and this is root; why not, otherwise."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver (as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            return f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = install_chromium()
    if reason:
        print(f"skipping the dashboard's browser tests: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--disable-gpu", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for console_errors()
    # The system's chromedriver, named: Selenium Manager has nothing to find or download.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    process = start_server(service_env(folder / "data", None, AL_API_KEYS=KEY), folder / "serve.log", port)
    yield f"http://127.0.0.1:{port}", process
    process.stop()


def api_client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {KEY}"})


def console_errors(driver) -> list[str]:
    """The browser console's severe messages since the last call (failed requests among them)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def dashboard(browser, server):
    """The browser, logged in through the key form as a person would; the server's url and process."""
    from selenium.webdriver.common.by import By

    url, process = server
    browser.get(f"{url}/ui/jobs")
    form = browser.find_element(By.CSS_SELECTOR, "form[action='/ui/key']")
    form.find_element(By.NAME, "key").send_keys(KEY)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(lambda: browser.find_elements(By.ID, "submit"), 10, "the jobs page after the key form")
    cookies = {c["name"]: c for c in browser.get_cookies()}
    assert KEY not in str(cookies) and cookies["al_session"]["httpOnly"]
    assert cookies["al_session"]["sameSite"] == "Strict"
    console_errors(browser)  # the key form itself answers 401
    return browser, url, process


def wait_js(driver, script: str, timeout: float, what: str):
    return wait_for(lambda: driver.execute_script(script), timeout, what, interval=0.2)


def screenshot(driver, path: Path) -> None:
    """The whole page: the window made as tall as the document first."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, height))
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)


def submit_from_form(driver, **fields: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    form = driver.find_element(By.ID, "submit")
    for name, value in fields.items():
        field = form.find_element(By.NAME, name)
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def click_in_live_list(driver, xpath: str) -> bool:
    """Clicks what `xpath` finds; False when the stream re-drew its row between the find and the click."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        driver.find_element(By.XPATH, xpath).click()
    except StaleElementReferenceException:
        return False
    return True


def row_status(driver, name: str) -> str | None:
    return driver.execute_script(
        "const a = [...document.querySelectorAll('#jobs tbody tr')].find(r => r.querySelector('a').textContent"
        " === arguments[0]); return a ? a.dataset.status : null;", name)


def page_number(text: str) -> float:
    return float(text[:-2]) / 100 if text.endswith(" %") else float(text)


def check_epoch_table(driver, epochs: list[dict]) -> None:
    """Every number of the page's epoch table is the API's, as shown (4 digits, or % to 2 decimals)."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#epochs tbody tr')].map(r => Object.fromEntries("
        "[...r.cells].map(c => [c.dataset.key, c.textContent])))")
    assert len(rows) == len(epochs)
    for row, metrics in zip(rows, epochs):
        assert set(row) >= {"epoch", "associated_loss", "autoencoder_loss", "val_accuracy", "train_accuracy"}
        for key, text in row.items():
            expected = metrics[key] if isinstance(metrics[key], list) else [metrics[key]]
            shown = [page_number(t) for t in text.split(" / ")]
            assert shown == pytest.approx(expected, rel=1e-3, abs=5e-5), (key, text, metrics[key])


def draw_digit(driver) -> None:
    """A '0': an ellipse drawn with the mouse (offsets from the canvas's centre)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    pad = driver.find_element(By.ID, "pad")
    points = [(int(45 * math.sin(2 * math.pi * i / 24)), int(-70 * math.cos(2 * math.pi * i / 24))) for i in range(25)]
    actions = ActionChains(driver).move_to_element_with_offset(pad, *points[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        actions.move_by_offset(x1 - x0, y1 - y0)
    actions.release().perform()


def test_train_watch_compare_predict_cancel(dashboard, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    browser, url, process = dashboard
    api = api_client(url)
    browser.get(url)
    assert browser.current_url == f"{url}/ui/jobs"

    # A BP job to compare with (through the API), then the AL job from the form; a third one to cancel.
    bp = api.post("/v1/jobs", json={"dataset": "digits", "name": "bp-digits", "method": "bp",
                                    "model": {"widths": [32, 32]}, "training": {"epochs": EPOCHS}}).json()
    submit_from_form(browser, dataset="digits", name="al-digits", widths="32,32", epochs=str(EPOCHS))
    wait_for(lambda: row_status(browser, "al-digits"), 10, "the submitted job's row")
    submit_from_form(browser, name="to-cancel", epochs="500", mode="threads", devices="cpu,cpu")
    wait_for(lambda: row_status(browser, "to-cancel"), 10, "the second job's row")
    wait_for(lambda: click_in_live_list(browser, "//tr[.//a[text()='to-cancel']]//button[@data-cancel]"), 10,
             "the cancel button")
    wait_for(lambda: row_status(browser, "to-cancel") == "cancelled", 60, "the cancel, shown from the stream")
    # A bad spec: the API's message, as it gave it.
    submit_from_form(browser, name="bad", widths="0", epochs="1")
    error = wait_for(lambda: browser.find_element(By.ID, "submit-error").text, 10, "the API's error")
    assert error.startswith("422: ") and "widths" in error
    assert [e for e in console_errors(browser) if "/v1/jobs - " not in e or "422" not in e] == []

    wait_for(lambda: row_status(browser, "al-digits") == "succeeded", 240, "the AL job to succeed, live in the list")
    assert console_errors(browser) == []  # e.g. no stream for a job id that is not there
    jobs = {j["name"]: j for j in api.get("/v1/jobs").json()["items"]}
    al_job = jobs["al-digits"]
    assert api.get(f"/v1/jobs/{bp['id']}").json()["status"] in ("running", "succeeded", "queued")

    browser.find_element(By.LINK_TEXT, "al-digits").click()
    wait_js(browser, f"return document.querySelectorAll('#epochs tbody tr').length === {EPOCHS}", 30, "every epoch")
    charts = browser.execute_script(
        "return [...document.querySelectorAll('.chart:not([hidden])')].map(c => [c.dataset.chart, +c.dataset.epochs])")
    titles = [title for title, _ in charts]
    assert any(t.startswith("Associated loss") for t in titles) and any(t.startswith("Autoencoder") for t in titles)
    assert "Accuracy" in titles and all(epochs == EPOCHS for _, epochs in charts), charts
    check_epoch_table(browser, api.get(f"/v1/jobs/{al_job['id']}/metrics").json()["epochs"])
    al_job = api.get(f"/v1/jobs/{al_job['id']}").json()
    bars = wait_js(browser, "return [...document.querySelectorAll('#test-depth .hbar')].map(b => b.textContent)",
                   10, "test accuracy by depth")
    assert [page_number(b.split(" · ")[0]) for b in bars] == pytest.approx(
        al_job["metrics"]["test_accuracy_by_depth"], abs=5e-5)
    assert browser.find_element(By.ID, "attempts").text == "1"

    wait_for(lambda: api.get(f"/v1/jobs/{bp['id']}").json()["status"] == "succeeded", 120, "the BP job")
    Select(browser.find_element(By.ID, "compare")).select_by_value(bp["id"])
    wait_js(browser, "const c = document.querySelector('[data-chart=Accuracy]'); return c.dataset.series === '4'",
            30, "the BP job's curves beside the AL job's")
    assert browser.find_element(By.CSS_SELECTOR, "[data-chart^='Loss (BP']").is_displayed()
    screenshot(browser, tmp_path / "dashboard-job.png")

    browser.find_element(By.LINK_TEXT, "al-digits v1").click()
    assert browser.find_element(By.ID, "pad").is_displayed()  # digits: an 8x8 drawing canvas
    draw_digit(browser)
    values = [float(v) for v in browser.find_element(By.ID, "inputs").get_attribute("value").split(",")]
    assert len(values) == 64 and 8 <= max(values) <= 16 and min(values) == 0  # digits' raw range: 0..16
    browser.find_element(By.ID, "predict").click()
    shown = wait_js(browser, "const rows = [...document.querySelectorAll('#probabilities tbody tr')];"
                    "return rows.length && rows.map(r => [r.querySelector('.prediction').textContent,"
                    " [...r.querySelectorAll('td.p')].map(c => +c.textContent)])", 20, "predictions at every depth")
    for depth, (prediction, probabilities) in enumerate(shown, 1):
        answer = api.post("/v1/models/al-digits/predict", json={"inputs": [values], "depth": depth}).json()
        assert prediction == str(answer["predictions"][0])
        assert probabilities == pytest.approx(answer["probabilities"][0], abs=0.006)
    assert len(shown) == len(al_job["metrics"]["test_accuracy_by_depth"])
    screenshot(browser, tmp_path / "dashboard-model.png")
    print(f"screenshots in {tmp_path}")
    assert console_errors(browser) == []
    assert "Traceback" not in process.output()


def test_upload_with_progress(dashboard, tmp_path):
    from selenium.webdriver.common.by import By

    browser, url, _ = dashboard
    path = tmp_path / "digits.npz"
    path.write_bytes(digits_npz())
    browser.get(f"{url}/ui/datasets")
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))
    browser.find_element(By.CSS_SELECTOR, "#upload button").click()
    status = wait_for(lambda: browser.find_element(By.ID, "upload-status").text.startswith("uploaded as")
                      and browser.find_element(By.ID, "upload-status").text, 30, "the upload")
    dataset_id = status.removeprefix("uploaded as ")
    assert api_client(url).get(f"/v1/datasets/{dataset_id}").json()["rows"] == 1797
    assert browser.find_element(By.CSS_SELECTOR, "#datasets tr.added td").text == dataset_id
    assert console_errors(browser) == []


def test_a_text_model_page_takes_a_text_and_shows_the_label_of_every_depth(dashboard, tmp_path):
    from selenium.webdriver.common.by import By
    from test_text import synthetic_texts, write_csv

    browser, url, process = dashboard
    api = api_client(url)
    upload = write_csv(tmp_path / "texts.csv", synthetic_texts(240)).read_bytes()
    dataset = api.post("/v1/datasets", files={"file": ("texts.csv", upload)}).json()
    job = api.post("/v1/jobs", json={"dataset": dataset["id"], "name": "texts", "training": {"epochs": 1},
                                     "model": {"arch": "lstm", "embedding_dim": 16, "widths": [8, 8],
                                               "target_width": 12, "max_tokens": 24, "vocab_size": 200}}).json()
    wait_for(lambda: api.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 120, "the LSTM job")
    browser.get(f"{url}/ui/models/texts")
    assert not browser.find_element(By.ID, "pad").is_displayed()  # no drawing canvas for a text model
    assert "a text" in browser.find_element(By.ID, "input-help").text
    text = "linux kernel code, and a compiler"
    browser.find_element(By.ID, "inputs").send_keys(text)
    browser.find_element(By.ID, "predict").click()
    shown = wait_js(browser, "const rows = [...document.querySelectorAll('#probabilities tbody tr')];"
                    "return rows.length && rows.map(r => r.querySelector('.prediction').textContent)", 20,
                    "the label at every depth")
    answers = [api.post("/v1/models/texts/predict", json={"inputs": [text], "depth": depth}).json()
               for depth in range(1, api.get("/v1/models/texts").json()["versions"][0]["depth"] + 1)]
    assert shown == [answer["labels"][0] for answer in answers] and len(shown) == 3  # the embedding, 2 LSTMs
    assert console_errors(browser) == []
    assert "Traceback" not in process.output()


def test_study_page_shows_trials_and_accuracy_against_each_parameter(dashboard, tmp_path):
    from selenium.webdriver.common.by import By

    browser, url, process = dashboard
    api = api_client(url)
    study = api.post("/v1/studies", json={
        "name": "digits-study", "dataset": "digits", "trials": 4, "pruner": {"type": "none"}, "seed": 0,
        "base": {"model": {"widths": [64], "target_width": 32}, "preset": "lean", "training": {"epochs": 1}},
        "space": {"training.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                  "model.encoder_activation": {"type": "categorical", "choices": ["relu", "tanh"]}}}).json()
    browser.get(f"{url}/ui/studies")
    browser.find_element(By.LINK_TEXT, "digits-study").click()
    # Live: the page follows the study's event stream until every trial is in its table as complete.
    wait_js(browser, "return [...document.querySelectorAll('#trials tbody tr')].filter("
            "r => r.dataset.state === 'complete').length === 4", 180, "four complete trials on the page")
    wait_for(lambda: api.get(f"/v1/studies/{study['id']}").json()["status"] == "succeeded", 30, "the study's end")
    done = api.get(f"/v1/studies/{study['id']}").json()
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#trials tbody tr')].map(r => [r.querySelector('[data-key=value]')"
        ".textContent, r.querySelector('[data-param=\"model.encoder_activation\"]').textContent])")
    assert shown == [[f"{100 * t['value']:.2f} %", t["params"]["model.encoder_activation"]] for t in done["trials"]]
    charts = browser.execute_script(
        "return [...document.querySelectorAll('#charts .chart')].map(c => [c.dataset.param, +c.dataset.points])")
    assert sorted(charts) == [["model.encoder_activation", 4], ["training.lr", 4]]
    wait_js(browser, "return document.querySelectorAll('#importances tr').length === 2", 30, "the importances")
    assert browser.find_element(By.LINK_TEXT, "digits-study v1").is_displayed()  # the best trial's model
    screenshot(browser, tmp_path / "dashboard-study.png")
    assert console_errors(browser) == []
    assert "Traceback" not in process.output()


def test_a_pareto_study_page_plots_its_front(dashboard, tmp_path):
    from selenium.webdriver.common.by import By

    browser, url, process = dashboard
    api = api_client(url)
    study = api.post("/v1/studies", json={
        "name": "front-study", "dataset": "digits", "trials": 3, "seed": 0,
        "objectives": ["val_accuracy", "train_seconds"],
        "base": {"model": {"widths": [64], "target_width": 32}, "preset": "lean", "training": {"epochs": 1}},
        "space": {"training.lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True}}}).json()
    browser.get(f"{url}/ui/studies/{study['id']}")
    wait_js(browser, "return document.querySelectorAll('#pareto circle').length === 3", 180, "three trials plotted")
    wait_for(lambda: api.get(f"/v1/studies/{study['id']}").json()["status"] == "succeeded", 30, "the study's end")
    done = api.get(f"/v1/studies/{study['id']}").json()
    browser.refresh()
    wait_js(browser, "return document.querySelectorAll('#pareto circle').length === 3", 30, "the plot again")
    front = browser.execute_script("return [...document.querySelectorAll('#pareto circle.front')]"
                                   ".map(c => +c.dataset.number).sort()")
    assert front == sorted(t["number"] for t in done["pareto"]) and front
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#trials tbody tr')].map(r => r.querySelector('[data-key=value]')"
        ".textContent)")
    assert shown == [f"{100 * t['values'][0]:.2f} %, {t['values'][1]:#.4g} s" for t in done["trials"]], shown
    assert "Pareto front" in browser.find_element(By.TAG_NAME, "main").text
    screenshot(browser, tmp_path / "dashboard-pareto.png")
    assert "Traceback" not in process.output()


def test_keys_gate_the_dashboard(tmp_path, monkeypatch):
    """With AL_API_KEYS, a page without a known key is the key form and nothing else. The form, with its
    session's CSRF token, logs the session in: the signed cookie holds the key's id, never the key, and the
    API then takes the session as it takes a bearer key, writes only with the token. A key in the address
    does nothing."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = use_env(monkeypatch, service_env(tmp_path / "data", None, AL_API_KEYS="k1,k2"))
    client = TestClient(create_app(settings))
    assert client.post("/v1/jobs", json={"dataset": "digits", "name": "secret-name"},
                       headers={"Authorization": "Bearer k1"}).status_code == 202
    for path in ("/ui/jobs", "/ui/jobs?key=k2", "/ui/models", "/ui/datasets"):
        page = client.get(path)
        assert page.status_code == 401 and 'name="key"' in page.text and "secret-name" not in page.text
    assert 'name="target" value="/ui/jobs"' in client.get("/ui/jobs?key=k2").text  # an old link's key is dropped
    assert client.get("/ui/static/common.js").status_code == 200  # scripts and styles hold no data
    assert client.get("/v1/jobs").status_code == 401

    token = form_token(client.get("/ui/jobs").text)
    without = client.post("/ui/key", data={"key": "k2", "target": "/ui/jobs"})
    assert without.status_code == 403 and "expired" in without.text  # no token: another site's form
    assert client.get("/v1/jobs").status_code == 401
    refused = client.post("/ui/key", data={"key": "nope", "target": "/ui/models", "csrf": token})
    assert refused.status_code == 401 and "unknown key" in refused.text
    stored = dashboard_login(client, "k2", "/ui/jobs?dataset=digits")
    assert stored.status_code == 303 and stored.headers["location"] == "/ui/jobs?dataset=digits"
    cookie = stored.headers["set-cookie"]
    assert cookie.startswith("al_session=") and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    session = base64.b64decode(client.cookies["al_session"].split(".")[0] + "==").decode()  # signed, not secret
    assert "k2" not in session and "secure" not in cookie.lower()
    page = client.get("/ui/jobs")
    assert "secret-name" in page.text
    assert client.get("/v1/jobs").status_code == 200  # the dashboard's own API calls and event streams
    job = client.get("/v1/jobs").json()["items"][0]["id"]
    assert client.post(f"/v1/jobs/{job}/cancel").status_code == 403  # a write without the page's token
    assert client.post(f"/v1/jobs/{job}/cancel", headers={"X-CSRF-Token": form_token(page.text)}).status_code == 202

    client.cookies.clear()
    taken = dashboard_login(client, "k1", "https://elsewhere.example/")
    assert taken.status_code == 303 and taken.headers["location"] == "/ui/jobs"
    assert client.get("/ui/models").status_code == 200
    https = TestClient(create_app(settings), base_url="https://testserver")
    assert "secure" in dashboard_login(https, "k1").headers["set-cookie"].lower()


def test_templates_and_static_files_are_package_data():
    """A non-editable install carries every file the dashboard serves."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app.ui"]
    ui = ROOT / "app" / "ui"
    for path in [*ui.glob("templates/**/*"), *ui.glob("static/**/*")]:
        if path.is_file():
            relative = path.relative_to(ui)
            assert any(relative.match(g) for g in globs), f"{relative} is not in package-data"


def test_the_dashboard_can_be_turned_off(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import create_app

    client = TestClient(create_app(use_env(monkeypatch, service_env(tmp_path / "data", None, AL_UI="0"))))
    assert client.get("/ui/jobs").status_code == 404
    assert client.get("/ui/static/common.js").status_code == 404
    assert client.get("/v1/jobs").status_code == 200  # the API is still there
