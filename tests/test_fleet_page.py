"""The fleet page (`GET /`, server/web) in a real browser: Debian's Chromium, headless, driven
by Selenium through Debian's chromedriver, against a server on the test database while a small
fleet reports (70 minutes of history and ten minutes a day ago, then one report per worker every
second).

The server runs in a thread of its own, so that the tests can block on the browser; a
middleware of the test watches (and can slow down) the page's requests. One browser session
serves the whole module, in file order; each test signs in first if it has to.
"""

import asyncio
import fnmatch
import json
import re
import struct
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from conftest import ROOT, TEST_SETTINGS, create_credentials, empty_tables
from helpers import Credentials, basic_auth, fetch, pass_time, set_database_open
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.support.ui import WebDriverWait

from server import demo, page
from server.app import create_app
from server.config import Settings

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
UPLOT_VERSION = "1.6.32"
REFRESH_SECONDS = 5  # app.js REFRESH_SECONDS
HISTORY_SECONDS = 3600 + 600
HISTORY_STEP = 15
DAY = 86400
LIVE_PERIOD = 1.0

# What daemons may send, shown as text and never run: each would alert, or load /x or /y.
HOSTILE_ID = "<img src=x onerror=alert(1)>"
HOSTILE_TAG = "<b onmouseover=alert(2)>tag</b>"
HOSTILE_QUEUE = '"><script>alert(3)</script>'
HOSTILE_TASK = "<img src=y onerror=alert(4)>"
HOSTILE_METRIC = "<svg onload=alert(5)>"
# The hostile worker's other keys: with them, its min, avg and max take more items than one
# get_stats may ask for (WORKERS_MAX_STATS_ITEMS, 64).
SENSORS = [f"sensor_{i:02d}" for i in range(15)]
HOSTILE_ELEMENTS = "#workers img, #workers script, #workers svg, #workers b, .chart img, .chart svg, .chart script"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


# --- the server, its fleet, and a watch on the page's requests --------------------------------


class Observer:
    """Every request the server gets (path, start, end), get_all's in flight at most, and a
    delay that the next get_all requests take before they are answered."""

    def __init__(self):
        self.requests: list[list] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.get_all_delay = 0.0

    @web.middleware
    async def middleware(self, request, handler):
        record = [request.path, time.monotonic(), None]
        self.requests.append(record)
        watched = request.path.endswith("workers.get_all")
        delay = self.get_all_delay if watched else 0
        if watched:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(delay)
            return await handler(request)
        finally:
            record[2] = time.monotonic()
            if watched:
                self.in_flight -= 1

    def get_alls(self) -> list[list]:
        return [record for record in self.requests if record[0].endswith("workers.get_all")]

    def paths(self) -> set[str]:
        return {record[0] for record in self.requests}


class ServerThread:
    """The application served on a loopback port from a thread with its own event loop."""

    def __init__(self, app: web.Application):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(app)

    def run(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> str:
        self.thread.start()
        self.run(self.runner.setup())
        self.run(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}/"

    def stop(self) -> None:
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Fleet:
    url: str
    dsn: str
    caller: Credentials
    observer: Observer
    workers: list[str]  # the demo machines', then the hostile one
    tags: dict[str, list[str]]


def hostile_machine() -> demo.Machine:
    return demo.Machine(worker=HOSTILE_ID, cores=4, gpus=0, memory_mb=16384, queues=[HOSTILE_QUEUE],
                        tags=[HOSTILE_TAG])


def report_of(machine: demo.Machine, timestamp_ms: int) -> dict:
    report = {**machine.report(), "timestamp": timestamp_ms}
    if machine.worker == HOSTILE_ID:
        report |= {"task": HOSTILE_TASK, "queue": HOSTILE_QUEUE}
        report["machine_stats"] |= {HOSTILE_METRIC: 1.5, **{key: i + 1.0 for i, key in enumerate(SENSORS)}}
    return report


async def post(session, url: str, endpoint: str, body: dict) -> int:
    async with session.post(url + endpoint, json=body) as response:
        await response.read()
        return response.status


async def seed_history(url: str, headers: dict, machines: list[demo.Machine]) -> None:
    """Registrations, then HISTORY_SECONDS of reports HISTORY_STEP apart."""
    async with aiohttp.ClientSession(headers=headers) as session:
        for machine in machines:
            body = {"worker": machine.worker, "queues": machine.queues, "tags": machine.tags, "timeout": 3600}
            assert await post(session, url, "workers.register", body) == 200
        now_ms = int(time.time() * 1000)
        # Ten minutes a day ago too: the 7 d and 30 d charts leave out their last, incomplete
        # bucket (SPEC §2), which may hold all of the last 70 minutes.
        ages = [*range(DAY + 600, DAY, -60), *range(HISTORY_SECONDS, 0, -HISTORY_STEP)]
        reports = [report_of(machine, now_ms - age * 1000) for age in ages for machine in machines]
        for start in range(0, len(reports), 50):
            statuses = await asyncio.gather(*(post(session, url, "workers.status_report", report)
                                              for report in reports[start:start + 50]))
            assert set(statuses) == {200}, statuses


async def report_live(url: str, headers: dict, machines: list[demo.Machine], stop: asyncio.Event) -> None:
    """One report per worker and period until stopped; refusals (the 503 test) are ignored."""
    async with aiohttp.ClientSession(headers=headers) as session:
        while not stop.is_set():
            for machine in machines:
                try:
                    await post(session, url, "workers.status_report", report_of(machine, int(time.time() * 1000)))
                except aiohttp.ClientError:
                    pass
            try:
                await asyncio.wait_for(stop.wait(), LIVE_PERIOD)
            except asyncio.TimeoutError:
                pass


@pytest.fixture(scope="module")
def fleet(database_dsn):
    """The served application, its credentials, its fleet (four demo machines and a hostile
    one) reporting, and the observer of its requests."""
    asyncio.run(empty_tables(database_dsn))
    caller = asyncio.run(create_credentials(database_dsn, "fleet-page", "viewer"))
    observer = Observer()
    app = create_app(Settings(db_dsn=database_dsn, **TEST_SETTINGS))
    app.middlewares.append(observer.middleware)
    server = ServerThread(app)
    url = server.start()
    machines = demo.fleet(4, seed=11) + [hostile_machine()]
    headers = {"Authorization": basic_auth(caller.access_key, caller.secret)}
    server.run(seed_history(url, headers, machines))
    stop = asyncio.Event()
    reporting = asyncio.run_coroutine_threadsafe(report_live(url, headers, machines, stop), server.loop)
    yield Fleet(url, database_dsn, caller, observer, [machine.worker for machine in machines],
                {machine.worker: machine.tags for machine in machines})
    server.loop.call_soon_threadsafe(stop.set)
    reporting.result(30)
    server.stop()


@pytest.fixture(scope="module")
def browser(monkeypatch_module):
    # Nothing may be downloaded: with the driver's path given, Selenium Manager must not run.
    def no_selenium_manager(*args, **kwargs):
        raise AssertionError("Selenium Manager was invoked")

    monkeypatch_module.setattr(SeleniumManager, "binary_paths", no_selenium_manager)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.console = []  # the browser's log, kept as it is read (reading it empties it)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# --- helpers ---------------------------------------------------------------------------------


def wait(driver, condition, message: str, timeout: float = 15):
    try:
        # Charts are remade when their series change: an element may go while it is read.
        waiting = WebDriverWait(driver, timeout, 0.1, ignored_exceptions=[StaleElementReferenceException])
        return waiting.until(lambda _: condition(), message)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s: {message}") from None


def console(driver) -> list[dict]:
    driver.console.extend(driver.get_log("browser"))
    return driver.console


def text_of(element) -> str:
    return element.get_attribute("textContent")


def shown_ids(driver) -> list[str]:
    return [text_of(cell) for cell in driver.find_elements(By.CSS_SELECTOR, "#workers tbody td.worker")]


def figures(driver, parent: str) -> dict:
    return {text_of(figure.find_element(By.CSS_SELECTOR, "figcaption .chart-title")): figure
            for figure in driver.find_elements(By.CSS_SELECTOR, f"#{parent} figure")}


def chart_note(figure) -> str:
    return text_of(figure.find_element(By.CSS_SELECTOR, "figcaption .chart-note"))


def legend_names(figure) -> list[str]:
    return [text_of(name) for name in figure.find_elements(By.CSS_SELECTOR, ".legend .name")]


def problem(driver) -> str:
    element = driver.find_element(By.ID, "problem")
    return element.text if element.is_displayed() else ""


def open_page(driver, fleet) -> None:
    driver.get(fleet.url)
    wait(driver, lambda: driver.find_element(By.ID, "access-key").is_displayed()
         or driver.find_element(By.ID, "fleet-view").is_displayed(), "the page to start")


def sign_in(driver, access_key: str, secret: str) -> None:
    for field, value in (("access-key", access_key), ("secret-key", secret)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "sign-in-button").click()


def signed_in(driver, fleet) -> None:
    """The fleet page, signed in, with every worker shown and no filter."""
    if not driver.current_url.startswith(fleet.url):
        open_page(driver, fleet)
    if not driver.find_element(By.ID, "fleet-view").is_displayed():
        sign_in(driver, fleet.caller.access_key, fleet.caller.secret)
    for field in ("tag-filter", "worker-pattern"):
        element = driver.find_element(By.ID, field)
        if element.get_attribute("value"):
            element.clear()
            element.send_keys(Keys.ENTER)
    wait(driver, lambda: sorted(shown_ids(driver)) == sorted(fleet.workers), "the whole fleet in the table")


def click_range(driver, label: str) -> None:
    driver.find_element(By.XPATH, f"//button[@data-range][normalize-space()='{label}']").click()


def chart_state(figure) -> tuple[int, float, float, int]:
    return (int(figure.get_attribute("data-points")), float(figure.get_attribute("data-from")),
            float(figure.get_attribute("data-to")), int(figure.get_attribute("data-nonzero")))


def canvas_size(figure) -> tuple[float, float]:
    canvas = figure.find_element(By.TAG_NAME, "canvas")
    return canvas.size["width"], canvas.size["height"]


def select_only(driver, worker: str) -> None:
    for row in driver.find_elements(By.CSS_SELECTOR, "#workers tbody tr"):
        checkbox = row.find_element(By.CSS_SELECTOR, "input[type=checkbox]")
        if checkbox.is_selected() != (text_of(row.find_element(By.CSS_SELECTOR, "td.worker")) == worker):
            checkbox.click()


# --- the files, their headers, the package ---------------------------------------------------


@pytest.mark.parametrize("path, content_type", [
    ("", "text/html"),
    ("static/app.js", "javascript"),
    ("static/style.css", "text/css"),
    ("static/vendor/uPlot.iife.min.js", "javascript"),
    ("static/vendor/uPlot.min.css", "text/css"),
])
def test_page_and_its_files_are_served_with_security_headers(fleet, path, content_type):
    status, headers, body = fetch(fleet.url + path)
    assert status == 200 and body
    assert content_type in headers["Content-Type"] and "charset=utf-8" in headers["Content-Type"]
    assert headers["Content-Security-Policy"] == CSP == page.CONTENT_SECURITY_POLICY
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"


def test_the_api_keeps_every_other_path(fleet):
    status, headers, body = fetch(fleet.url, method="POST", body=b"")  # the page is GET / only
    assert status == 405 and orjson.loads(body)["meta"]["result_subcode"] == 0 and headers["Allow"] == "GET, HEAD"
    status, headers, body = fetch(fleet.url + "workers.get_count")
    assert status == 401 and orjson.loads(body)["meta"]["result_subcode"] == 20
    assert fetch(fleet.url + "static/nothing.js")[0] == 404


def test_the_page_has_no_inline_script_or_style():
    html = (ROOT / "server" / "web" / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html and " style=" not in html
    assert not re.search(r"\son\w+=", html)
    script = (ROOT / "server" / "web" / "app.js").read_text()
    assert "innerHTML" not in script and "eval(" not in script and "insertAdjacentHTML" not in script


def test_the_files_are_package_data_and_the_vendored_version_is_recorded():
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    packaged = {path for pattern in settings["server"] for path in (ROOT / "server").glob(pattern) if path.is_file()}
    shipped = {path for path in (ROOT / "server" / "web").rglob("*") if path.is_file()}
    assert shipped >= {ROOT / "server" / "web" / name for name in ("index.html", "app.js", "style.css")}
    assert packaged == shipped
    vendor = ROOT / "server" / "web" / "vendor"
    banner = f"/*! https://github.com/leeoniya/uPlot (v{UPLOT_VERSION}) */"
    assert (vendor / "uPlot.iife.min.js").read_text().startswith(banner)
    assert "MIT License" in (vendor / "uPlot.LICENSE").read_text()
    assert f"uplot@{UPLOT_VERSION}" in (vendor / "README.md").read_text()
    assert f"uPlot {UPLOT_VERSION}" in (ROOT / "README.md").read_text()


# --- the page in the browser -----------------------------------------------------------------


def test_wrong_credentials_are_said_clearly(browser, fleet):
    open_page(browser, fleet)
    sign_in(browser, fleet.caller.access_key, "not-the-secret")
    message = browser.find_element(By.ID, "sign-in-message")
    wait(browser, message.is_displayed, "a message about the credentials")
    assert message.text == "Wrong access key or secret."
    assert not browser.find_element(By.ID, "fleet-view").is_displayed()
    assert browser.execute_script("return sessionStorage.length + localStorage.length") == 0


def test_signed_in_the_fleet_and_its_charts_are_shown(browser, fleet):
    signed_in(browser, fleet)
    token = browser.execute_script("return sessionStorage.getItem('workers-fleet-token')")
    assert token and token.count(".") == 2
    assert browser.execute_script("return localStorage.length") == 0 and token not in browser.current_url
    assert browser.find_element(By.ID, "count").text == f"{len(fleet.workers)} workers"
    assert browser.find_element(By.ID, "identity").text == "viewer · fleet-page"

    worker = fleet.workers[0]
    row = browser.find_element(By.XPATH, f"//tbody/tr[td[@class='worker' and text()='{worker}']]")
    cells = [text_of(cell) for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[5] == " ".join(fleet.tags[worker])
    assert cells[6] == "127.0.0.1"
    assert re.fullmatch(r"\d+ s ago", cells[2]), cells[2]  # health first: the last report
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[7]), cells[7]

    # The activity over the last hour at 15 s (the test server's chart minimum is 1 s).
    activity = wait(browser, lambda: figures(browser, "activity-chart").get(""), "the activity chart")
    wait(browser, lambda: int(activity.get_attribute("data-nonzero") or 0) > 0, "activity data")
    points, first, last, nonzero = chart_state(activity)
    assert 239 <= points <= 241 and abs(first - (time.time() - 3600)) < 60 and nonzero >= points - 2
    assert min(canvas_size(activity)) > 100
    assert browser.find_element(By.ID, "range-note").text == "last 1 h, every worker"
    assert re.fullmatch(r"15 s buckets; the last \(from \d\d:\d\d\) still filling", chart_note(activity))

    # The first four workers are charted: every metric key of theirs, a series each.
    charted = shown_ids(browser)[:4]
    keys = {"cpu_usage (%)", "memory_used (MB)", "memory_free (MB)", "network_rx (MB/s)", "network_tx (MB/s)",
            "disk_free_home"}
    wait(browser, lambda: keys <= set(figures(browser, "metric-charts")), "the metric charts")
    for title, figure in figures(browser, "metric-charts").items():
        points, first, last, nonzero = chart_state(figure)
        assert 239 <= points <= 241 and nonzero > 0 and min(canvas_size(figure)) > 100, title
        assert chart_note(figure).startswith("15 s buckets"), title
    assert legend_names(figures(browser, "metric-charts")["cpu_usage (%)"]) == charted
    assert browser.find_element(By.ID, "metrics-note").text == "4 charted: averages; gaps where nothing was reported"

    browser.find_element(By.ID, "select-all").click()
    wait(browser, lambda: browser.find_element(By.ID, "metrics-note").text.startswith("5 charted: averages"), "all")
    cpu = wait(browser, lambda: figures(browser, "metric-charts").get("cpu_usage (%)"), "the CPU chart")
    assert legend_names(cpu) == shown_ids(browser)


def test_hostile_worker_data_shows_as_text(browser, fleet):
    signed_in(browser, fleet)
    row = browser.find_element(By.XPATH, f"//tbody/tr[td[@class='worker' and text()='{HOSTILE_ID}']]")
    cells = [text_of(cell) for cell in row.find_elements(By.TAG_NAME, "td")]
    assert [cells[1], *cells[3:6]] == [HOSTILE_ID, HOSTILE_TASK, HOSTILE_QUEUE, HOSTILE_TAG]

    select_only(browser, HOSTILE_ID)
    keys = {"cpu_usage (%)", "cpu_temperature (°C)", "memory_used (MB)", "memory_free (MB)", "disk_free_home",
            "disk_read (MB/s)", "disk_write (MB/s)", "network_rx (MB/s)", "network_tx (MB/s)", HOSTILE_METRIC, *SENSORS}
    assert len(keys) * 3 > 64
    wait(browser, lambda: set(figures(browser, "metric-charts")) == keys, "a chart for every metric key of the worker")
    note = f"{HOSTILE_ID}: min, average and max; gaps where nothing was reported"
    wait(browser, lambda: browser.find_element(By.ID, "metrics-note").text == note, "the worker alone charted")
    wait(browser, lambda: set(figures(browser, "metric-charts")) == keys, "its charts alone")
    metric = figures(browser, "metric-charts")[HOSTILE_METRIC]
    wait(browser, lambda: int(metric.get_attribute("data-nonzero")) > 0, "its data")
    assert legend_names(metric) == ["avg", "min", "max"]

    time.sleep(0.5)  # an image's onerror would have fired by now
    assert browser.find_elements(By.CSS_SELECTOR, HOSTILE_ELEMENTS) == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert
    assert browser.title == "Workers fleet"
    assert not {"/x", "/y"} & fleet.observer.paths()  # no image was ever asked for
    select_only(browser, fleet.workers[0])  # fewer charts for the tests that follow


def test_the_table_sorts(browser, fleet):
    signed_in(browser, fleet)
    worker_header = browser.find_element(By.CSS_SELECTOR, "th[data-sort='id']")
    ascending = shown_ids(browser)
    assert worker_header.get_attribute("aria-sort") == "ascending"
    assert ascending == [HOSTILE_ID, *sorted(fleet.workers[:-1])]  # '<' before letters
    worker_header.find_element(By.TAG_NAME, "button").click()
    assert shown_ids(browser) == ascending[::-1] and worker_header.get_attribute("aria-sort") == "descending"

    browser.find_element(By.CSS_SELECTOR, "th[data-sort='tags'] button").click()
    by_tags = sorted(fleet.workers[:-1], key=lambda worker: (" ".join(fleet.tags[worker]), worker))
    assert shown_ids(browser) == [HOSTILE_ID, *by_tags]
    assert worker_header.get_attribute("aria-sort") is None
    browser.find_element(By.CSS_SELECTOR, "th[data-sort='id'] button").click()
    assert shown_ids(browser) == ascending


def test_filter_by_tags_and_worker_pattern(browser, fleet):
    signed_in(browser, fleet)
    count = browser.find_element(By.ID, "count")

    def filtered(field: str, value: str, expected: list[str]) -> None:
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value, Keys.ENTER)
        wait(browser, lambda: sorted(shown_ids(browser)) == sorted(expected), f"{field} {value!r}: {expected}")
        wait(browser, lambda: count.text == f"{len(expected)} worker{'' if len(expected) == 1 else 's'}", "the count")

    spot = [worker for worker, tags in fleet.tags.items() if "spot" in tags]
    assert 0 < len(spot) < len(fleet.workers)
    filtered("tag-filter", "spot", spot)
    filtered("tag-filter", "-spot", [worker for worker in fleet.workers if worker not in spot])
    filtered("tag-filter", "spot rack-a", [w for w, tags in fleet.tags.items() if {"spot", "rack-a"} & set(tags)])
    filtered("tag-filter", "", fleet.workers)
    gpu = [worker for worker in fleet.workers if fnmatch.fnmatchcase(worker, "demo-*:gpu:?")]
    filtered("worker-pattern", "demo-*:gpu:?", gpu)
    filtered("worker-pattern", "nothing-*", [])
    assert browser.find_element(By.ID, "no-workers").is_displayed()
    filtered("worker-pattern", "", fleet.workers)


def test_the_time_range_changes_the_charts_in_place(browser, fleet):
    signed_in(browser, fleet)
    activity = figures(browser, "activity-chart")[""]
    canvas = activity.find_element(By.TAG_NAME, "canvas")
    for label, seconds, note, buckets in (("6 h", 6 * 3600, "2 min", 180), ("30 d", 30 * 86400, "3 h", 240),
                                          ("1 h", 3600, "15 s", 240)):
        click_range(browser, label)
        wait(browser, lambda: browser.find_element(By.ID, "range-note").text == f"last {label}, every worker", label)
        wait(browser, lambda: chart_note(activity).startswith(f"{note} buckets"), f"{label}: {note} buckets")
        wait(browser, lambda: abs(chart_state(activity)[1] - (time.time() - seconds)) < seconds / buckets + 60,
             f"the activity chart over {label}")
        points, first, last, nonzero = chart_state(activity)
        assert buckets - 1 <= points <= buckets + 1 and nonzero > 0, (label, points, nonzero)
        pressed = browser.find_elements(By.CSS_SELECTOR, "[data-range][aria-pressed='true']")
        assert [button.text for button in pressed] == [label]
        for title, figure in figures(browser, "metric-charts").items():
            wait(browser, lambda: buckets - 1 <= chart_state(figure)[0] <= buckets + 1, f"{title} over {label}")
    # Redrawn with new data, not remade: the same canvas throughout (no flicker).
    assert canvas.is_displayed() and activity.find_element(By.TAG_NAME, "canvas") == canvas


def filter_by(driver, field: str, value: str) -> None:
    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(value, Keys.ENTER)


def test_charts_leave_gaps_where_nothing_was_reported(browser, fleet):
    signed_in(browser, fleet)
    select_only(browser, fleet.workers[0])
    click_range(browser, "24 h")
    cpu = wait(browser, lambda: figures(browser, "metric-charts").get("cpu_usage (%)"), "the CPU chart")
    # 5-minute buckets; the worker reported in the last 70 minutes only (and a day and more ago)
    wait(browser, lambda: chart_state(cpu)[0] >= 288 and chart_note(cpu).startswith("5 min buckets"), "24 h")
    points, _, _, nonzero = chart_state(cpu)
    empty = int(cpu.get_attribute("data-empty"))
    assert 3 * (points - 16) <= empty <= 3 * (points - 14), (points, empty)  # avg, min and max: null, not 0
    assert nonzero > 0
    click_range(browser, "1 h")


def test_every_range_shows_the_newest_bucket_marked_as_filling(browser, fleet):
    signed_in(browser, fleet)
    activity = figures(browser, "activity-chart")[""]
    for label, step in (("24 h", 300), ("7 d", 3600), ("30 d", 3 * 3600)):
        click_range(browser, label)
        wait(browser, lambda: chart_note(activity).startswith(f"{step // 3600 or step // 60} "), f"{label} buckets")
        wait(browser, lambda: activity.get_attribute("data-partial") == activity.get_attribute("data-to") != "",
             f"{label}: the last bucket marked as filling")
        newest = float(activity.get_attribute("data-to"))
        assert newest <= time.time() < newest + step + 10, label  # the bucket that holds now
        assert "still filling" in chart_note(activity)
        assert json.loads(activity.get_attribute("data-last"))[0] == len(fleet.workers), label  # all report live
    click_range(browser, "1 h")


def test_the_activity_follows_the_table_filter(browser, fleet):
    signed_in(browser, fleet)
    activity = figures(browser, "activity-chart")[""]
    assert legend_names(activity) == ["reporting", "with a task"]
    note = browser.find_element(By.ID, "range-note")
    peak = lambda: json.loads(activity.get_attribute("data-peaks") or "[0]")[0]  # noqa: E731

    filter_by(browser, "worker-pattern", "nothing-*")
    wait(browser, lambda: note.text == "last 1 h, the 0 workers in the table", "no worker matches")
    wait(browser, lambda: activity.get_attribute("data-points") == "0", "an empty activity chart")

    spot = [worker for worker, tags in fleet.tags.items() if "spot" in tags]
    filter_by(browser, "worker-pattern", "")
    filter_by(browser, "tag-filter", "spot")
    wait(browser, lambda: note.text == f"last 1 h, the {len(spot)} workers in the table", "the spot workers")
    wait(browser, lambda: peak() == len(spot), "the activity of the spot workers alone")
    filter_by(browser, "tag-filter", "")
    wait(browser, lambda: note.text == "last 1 h, every worker" and peak() == len(fleet.workers), "everyone again")


def test_times_in_one_format_with_the_zone_and_a_utc_switch(browser, fleet):
    new_york = ZoneInfo("America/New_York")
    offset = int(datetime.now(new_york).utcoffset().total_seconds()) // 60
    expected_zone = f"America/New_York (UTC{'−' if offset < 0 else '+'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d})"
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "America/New_York"})
    try:
        browser.refresh()
        signed_in(browser, fleet)
        status, _, body = fetch(fleet.url + "workers.get_all", method="POST", body=b"{}",
                                headers={"Authorization": basic_auth(fleet.caller.access_key, fleet.caller.secret)})
        assert status == 200
        worker = orjson.loads(body)["data"]["workers"][0]
        registered = datetime.fromisoformat(worker["register_time"])
        row = browser.find_element(By.XPATH, f"//tbody/tr[td[@class='worker' and text()='{worker['id']}']]")
        cell = row.find_elements(By.TAG_NAME, "td")[7]
        zone_note = browser.find_element(By.ID, "zone-note")

        wait(browser, lambda: zone_note.text == f"times in {expected_zone}", "the browser's zone said")
        assert text_of(cell) == registered.astimezone(new_york).strftime("%Y-%m-%d %H:%M:%S")
        browser.find_element(By.CSS_SELECTOR, "[data-zone='utc']").click()
        wait(browser, lambda: zone_note.text == "times in UTC", "UTC said")
        wait(browser, lambda: text_of(cell) == registered.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             "the table in UTC")
        assert browser.execute_script("return localStorage.getItem('workers-fleet-zone')") == "utc"
        assert browser.execute_script("return localStorage.length") == 1  # the choice, never the token
        browser.refresh()
        wait(browser, lambda: browser.find_element(By.ID, "zone-note").text == "times in UTC", "the choice kept")
        browser.find_element(By.CSS_SELECTOR, "[data-zone='local']").click()
        wait(browser, lambda: browser.find_element(By.ID, "zone-note").text == f"times in {expected_zone}", "local")
        assert browser.execute_script("return localStorage.length") == 0
    finally:
        browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ""})
        browser.execute_script("localStorage.clear()")


def gpus_of(fleet) -> dict[str, int]:
    """The demo machines' GPU counts (the fleet fixture's machines, made again: same seed)."""
    return {machine.worker: machine.gpus for machine in demo.fleet(4, seed=11)}


def test_a_worker_alone_has_its_gpu_metrics_per_gpu(browser, fleet):
    signed_in(browser, fleet)
    worker, count = max(gpus_of(fleet).items(), key=lambda item: item[1])
    assert count >= 1
    select_only(browser, worker)
    per_gpu = [f"GPU {i}" for i in range(count)]
    wait(browser, lambda: legend_names(figures(browser, "metric-charts")["gpu_usage (%)"]) == per_gpu, "a series per GPU")
    cpu = figures(browser, "metric-charts")["cpu_usage (%)"]
    assert legend_names(cpu) == ["avg", "min", "max"]  # the other metrics as before
    assert browser.find_element(By.ID, "metrics-note").text.startswith(f"{worker}: min, average and max; GPU metrics per GPU")
    select_only(browser, fleet.workers[0])


def test_the_gpu_heatmap(browser, fleet):
    signed_in(browser, fleet)
    with_gpus = sorted(worker for worker, count in gpus_of(fleet).items() if count)
    assert 0 < len(with_gpus) < len(fleet.workers)
    canvas = browser.find_element(By.ID, "heatmap")
    wait(browser, lambda: canvas.is_displayed() and canvas.get_attribute("data-workers") == str(len(with_gpus)),
         "a row per worker with GPUs")
    assert canvas.get_attribute("data-rows") == str(len(with_gpus))
    assert 100 <= int(canvas.get_attribute("data-columns")) <= 125  # about 120 buckets over the hour
    note = browser.find_element(By.ID, "heatmap-note").text
    assert note.startswith(f"{len(with_gpus)} workers, busiest first; 30 s buckets"), note
    ActionChains(browser).move_to_element_with_offset(canvas, 0, 0).perform()  # its middle
    readout = browser.find_element(By.ID, "heatmap-readout")
    wait(browser, lambda: re.fullmatch(r"(.+), \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: (\d+(\.\d+)? %|no report)", readout.text),
         "the worker, time and value under the pointer")
    assert readout.text.split(", ")[0] in with_gpus

    filter_by(browser, "worker-pattern", "demo-*:cpu:?")  # workers without GPUs: no heatmap
    wait(browser, lambda: not browser.find_element(By.ID, "gpu-panel").is_displayed(), "the heatmap hidden")
    filter_by(browser, "worker-pattern", "")
    wait(browser, lambda: canvas.is_displayed(), "the heatmap back")


def test_refreshes_are_periodic_and_never_pile_up(browser, fleet):
    signed_in(browser, fleet)
    observer = fleet.observer
    wait(browser, lambda: observer.in_flight == 0, "a quiet moment")
    observer.most_in_flight = 0
    observer.get_all_delay = REFRESH_SECONDS + 1  # the next refresh hangs past the refresh period
    before = len(observer.get_alls())
    click_range(browser, "1 h")
    wait(browser, lambda: observer.in_flight == 1, "a slow refresh")
    observer.get_all_delay = 0
    click_range(browser, "6 h")  # asked for meanwhile: it waits for the slow one
    slow = observer.get_alls()[before]
    wait(browser, lambda: slow[2] is not None, "the slow refresh to end", timeout=3 * REFRESH_SECONDS)
    wait(browser, lambda: len(observer.get_alls()) > before + 1, "the refresh asked for meanwhile")
    assert len(observer.get_alls()) == before + 2
    queued = observer.get_alls()[before + 1]
    assert queued[1] >= slow[2] and queued[1] - slow[2] < 4  # when the slow refresh has drawn its charts
    wait(browser, lambda: len(observer.get_alls()) > before + 2, "the periodic refresh", timeout=3 * REFRESH_SECONDS)
    periodic = observer.get_alls()[before + 2]
    assert REFRESH_SECONDS <= periodic[1] - queued[1] < REFRESH_SECONDS + 5
    assert observer.most_in_flight == 1
    click_range(browser, "1 h")


def test_a_503_is_said_and_the_page_recovers(browser, fleet):
    signed_in(browser, fleet)
    rows_before = shown_ids(browser)
    asyncio.run(set_database_open(fleet.dsn, False))
    try:
        click_range(browser, "1 h")
        wait(browser, lambda: "503" in problem(browser), "the 503 message")
        assert problem(browser).startswith("The server is unavailable (503: database temporarily unavailable")
        assert "retrying every 5 s" in problem(browser).lower()
        assert shown_ids(browser) == rows_before  # the last data stays, dimmed
        assert "stale" in browser.find_element(By.ID, "fleet-view").get_attribute("class")
    finally:
        asyncio.run(set_database_open(fleet.dsn, True))
    wait(browser, lambda: problem(browser) == "", "the page to recover", timeout=4 * REFRESH_SECONDS)
    assert "stale" not in browser.find_element(By.ID, "fleet-view").get_attribute("class")


def test_an_unreachable_server_is_said(browser, fleet):
    signed_in(browser, fleet)
    browser.set_network_conditions(offline=True, latency=0, download_throughput=-1, upload_throughput=-1)
    try:
        click_range(browser, "1 h")
        wait(browser, lambda: problem(browser) == "Cannot reach the server. Retrying every 5 s…", "the message")
    finally:
        browser.delete_network_conditions()
    click_range(browser, "1 h")
    wait(browser, lambda: problem(browser) == "", "the page to recover")


def test_a_phone_sized_window(browser, fleet):
    signed_in(browser, fleet)
    try:
        browser.set_window_size(390, 844)
        wait(browser, lambda: browser.execute_script("return innerWidth") <= 390, "the small window")
        width = browser.execute_script("return innerWidth")
        scroller = browser.find_element(By.CSS_SELECTOR, ".table-scroll")
        assert browser.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", scroller)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        # Health first: the last report is on screen without scrolling sideways.
        last_report = browser.find_element(By.CSS_SELECTOR, "th[data-sort='last_report']")
        assert browser.execute_script("return arguments[0].getBoundingClientRect().right", last_report) <= width
        for figure in [*figures(browser, "activity-chart").values(), *figures(browser, "metric-charts").values()]:
            wait(browser, lambda: 100 < canvas_size(figure)[0] <= width - 20, "charts as wide as the phone")
            legend = figure.find_element(By.CSS_SELECTOR, ".legend")
            assert legend.size["height"] <= canvas_size(figure)[1] / 3  # compact legends

        # Without hovering, the legend gives each series' newest value; a touch moves the cursor.
        cpu = figures(browser, "metric-charts")["cpu_usage (%)"]
        when = cpu.find_element(By.CSS_SELECTOR, ".legend-time")
        assert text_of(when) == "newest:"
        assert all(re.fullmatch(r"\d+(\.\d+)? %", text_of(v)) for v in cpu.find_elements(By.CSS_SELECTOR, ".legend .value"))
        over = cpu.find_element(By.CSS_SELECTOR, ".u-over")
        box = browser.execute_script("arguments[0].scrollIntoView({block: 'center'});"
                                     "return arguments[0].getBoundingClientRect().toJSON()", over)
        point = {"x": box["x"] + box["width"] / 2, "y": box["y"] + box["height"] / 2}
        browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 1})
        try:
            browser.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [point]})
            browser.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        finally:
            browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})
        wait(browser, lambda: re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text_of(when)), "the touched time")
    finally:
        browser.set_window_size(1280, 900)
    activity = figures(browser, "activity-chart")[""]
    wait(browser, lambda: canvas_size(activity)[0] > 1000, "charts as wide as the window again")


# Three more workers for the health test: 31 minutes of reports a minute apart (for them alone,
# time passes by pass_time), after which dead-1 stops for 200 s: more than 3 of its periods.
HEALTH_STATS = {
    "quiet-1": {"cpu_usage": [0, 0], "gpu_usage": [0, 80]},
    "hot-1": {"cpu_usage": [100, 100], "gpu_usage": [100]},
    "dead-1": {"cpu_usage": [100], "gpu_usage": [0]},
}


async def report_health_workers(fleet) -> None:
    conn = await asyncpg.connect(fleet.dsn)
    headers = {"Authorization": basic_auth(fleet.caller.access_key, fleet.caller.secret)}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            for minute in range(31):
                if minute:
                    await pass_time(conn, 60, list(HEALTH_STATS))
                for worker, stats in HEALTH_STATS.items():
                    body = {"worker": worker, "timestamp": int(time.time() * 1000), "machine_stats": stats}
                    assert await post(session, fleet.url, "workers.status_report", body) == 200
            await pass_time(conn, 200, ["dead-1"])
    finally:
        await conn.close()


def health_items(driver, list_id: str) -> list[list[str]]:
    return [[text_of(part) for part in item.find_elements(By.TAG_NAME, "span")]
            for item in driver.find_elements(By.CSS_SELECTOR, f"#{list_id} li")]


def test_silent_workers_idle_gpus_and_the_busiest_and_idlest(browser, fleet):
    signed_in(browser, fleet)
    try:
        asyncio.run(report_health_workers(fleet))
        silent = lambda: [text_of(row.find_element(By.CSS_SELECTOR, "td.worker"))  # noqa: E731
                          for row in browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr.silent")]
        wait(browser, lambda: silent() == ["dead-1"], "dead-1 marked silent, and no other worker")
        row = browser.find_element(By.XPATH, "//tbody/tr[td[@class='worker' and text()='dead-1']]")
        cell = row.find_elements(By.TAG_NAME, "td")[2]
        assert re.fullmatch(r"silent 3 min ago", text_of(cell)), text_of(cell)
        assert text_of(cell.find_element(By.CSS_SELECTOR, ".silent-mark")) == "silent"
        title = cell.get_attribute("title")
        assert title.startswith("Silent since ") and "no report for 3 of its report periods" in title, title
        assert "it reports every ~60 s" in title
        counter = browser.find_element(By.ID, "silent-count")
        assert counter.is_displayed() and counter.text == "1 silent"
        counter.click()  # the silent first
        assert shown_ids(browser)[0] == "dead-1"
        header = browser.find_element(By.CSS_SELECTOR, "th[data-sort='last_report']")
        assert header.get_attribute("aria-sort") == "ascending"

        # GPU 0 of quiet-1 alone is idle: its GPU 1 is busy, dead-1's is not known since it went
        # silent, and the demo machines' GPUs were first reported less than 30 minutes ago.
        wait(browser, lambda: [item[:2] for item in health_items(browser, "idle-gpus")] == [["quiet-1", "GPU 0"]],
             "the idle GPUs")
        assert re.fullmatch(r"3[01] min", health_items(browser, "idle-gpus")[0][2])
        assert "of" in browser.find_element(By.ID, "idle-gpu-count").text
        # The busiest and idlest: dead-1 (at 100 %) is left out, being silent.
        assert health_items(browser, "busiest-cpu")[0] == ["hot-1", "100 %"]
        assert health_items(browser, "busiest-gpu")[0] == ["hot-1", "100 %"]
        assert health_items(browser, "idlest-cpu")[0] == ["quiet-1", "0.0 %"]
        for list_id in ("busiest-cpu", "idlest-cpu", "busiest-gpu", "idlest-gpu"):
            items = health_items(browser, list_id)
            assert 0 < len(items) <= 5 and "dead-1" not in [item[0] for item in items], list_id
        rules = browser.find_element(By.ID, "health-rules").text
        assert "no report for 3 of its own report periods" in rules and "below 5 % in every report for 30 min" in rules
    finally:
        for worker in HEALTH_STATS:
            fetch(fleet.url + "workers.unregister", method="POST", body=orjson.dumps({"worker": worker}),
                  headers={"Authorization": basic_auth(fleet.caller.access_key, fleet.caller.secret)})
        browser.find_element(By.CSS_SELECTOR, "th[data-sort='id'] button").click()
    wait(browser, lambda: not browser.find_element(By.ID, "silent-count").is_displayed(), "no silent worker left")


def test_an_ended_session_signs_out(browser, fleet):
    signed_in(browser, fleet)
    status, _, body = fetch(fleet.url + "auth.login", method="POST", body=b'{"expiration_sec": 3}',
                            headers={"Authorization": basic_auth(fleet.caller.access_key, fleet.caller.secret)})
    assert status == 200
    short_token = orjson.loads(body)["data"]["token"]
    browser.execute_script("sessionStorage.setItem('workers-fleet-token', arguments[0])", short_token)
    browser.refresh()  # the page takes the session's token: still signed in
    wait(browser, lambda: browser.find_element(By.ID, "fleet-view").is_displayed() and shown_ids(browser),
         "the fleet with the short token")
    message = browser.find_element(By.ID, "sign-in-message")
    wait(browser, message.is_displayed, "signed out on the 401", timeout=3 + 3 * REFRESH_SECONDS)
    assert message.text.startswith("Signed out: the server no longer accepts this session (Invalid token: the token "
                                   "has expired)")
    assert not browser.find_element(By.ID, "fleet-view").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0


def test_sign_out(browser, fleet):
    signed_in(browser, fleet)
    browser.find_element(By.ID, "sign-out").click()
    wait(browser, browser.find_element(By.ID, "access-key").is_displayed, "the sign-in form")
    assert browser.execute_script("return sessionStorage.length") == 0
    assert browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr, figure canvas") == []
    calls = len(fleet.observer.get_alls())
    time.sleep(REFRESH_SECONDS + 0.5)
    assert len(fleet.observer.get_alls()) == calls  # no more refreshes
    browser.refresh()
    wait(browser, browser.find_element(By.ID, "access-key").is_displayed, "the sign-in form after a reload")


def test_no_content_security_policy_violation_nor_script_error(browser, fleet):
    messages = [entry["message"] for entry in console(browser)]
    assert messages, "the browser's log is read"
    assert not [m for m in messages if "Content Security Policy" in m or "Uncaught" in m], messages
    # And the policy is in force, and its violations do reach the log read above.
    browser.execute_script("const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
                           "document.body.append(s)")
    assert browser.execute_script("return window.ran") is None
    wait(browser, lambda: any("Content Security Policy" in entry["message"] for entry in console(browser)),
         "the violation in the log")


def test_the_screenshot_script_takes_the_page(fleet, tmp_path):
    """scripts/screenshot-fleet-page.py, as docs/fleet-page.md documents it, on this fleet."""
    credentials = tmp_path / "credentials"
    credentials.write_text(f"access_key {fleet.caller.access_key}\nsecret_key {fleet.caller.secret}\n")
    output = tmp_path / "fleet-page.png"
    taken = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshot-fleet-page.py"),
         "--url", fleet.url, "--credentials", str(credentials), "--output", str(output)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert taken.returncode == 0, taken.stderr
    png = output.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", png[16:24])[0] == 1280  # the IHDR's width


def queue_rows(driver) -> dict[str, list[str]]:
    return {row.get_attribute("data-queue"): [text_of(cell) for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in driver.find_elements(By.CSS_SELECTOR, "#queues tbody tr")}


def test_the_queue_view_counts_each_queue_and_charts_the_chosen_one(browser, fleet):
    signed_in(browser, fleet)
    machines = demo.fleet(4, seed=11)  # the fleet fixture's machines
    wait(browser, lambda: HOSTILE_QUEUE in queue_rows(browser), "the queue table")
    rows = queue_rows(browser)
    assert set(rows) == {HOSTILE_QUEUE, *(queue for m in machines for queue in m.queues)}
    # Every demo machine listens to "default": their workers, cores and GPUs add up.
    default = rows["default"]
    assert default[0] == "default" and int(default[1]) == len(machines)
    assert int(default[2]) + int(default[3]) == len(machines)
    assert default[4] == "–" or default[4].endswith(" %")
    assert (int(default[5]), int(default[6])) == (sum(m.cores for m in machines), sum(m.gpus for m in machines))
    assert default[7].endswith(" GB")
    # The hostile worker's queue shows as text, busy (its reports carry a task); a click charts it.
    assert rows[HOSTILE_QUEUE][:5] == [HOSTILE_QUEUE, "1", "1", "0", "100 %"]

    def choose_hostile():
        try:
            [row] = [r for r in browser.find_elements(By.CSS_SELECTOR, "#queues tbody tr")
                     if r.get_attribute("data-queue") == HOSTILE_QUEUE]
            row.click()
            return True
        except StaleElementReferenceException:  # a refresh replaced the rows meanwhile
            return False

    wait(browser, choose_hostile, "a click on the hostile queue's row")
    chart = wait(browser, lambda: figures(browser, "queue-chart").get(HOSTILE_QUEUE), "the hostile queue's chart")
    assert legend_names(chart) == ["listening", "busy"]
    wait(browser, lambda: int(chart.get_attribute("data-nonzero") or 0) > 0, "queue data")
    points, first, last, nonzero = chart_state(chart)
    assert 239 <= points <= 241 and abs(first - (time.time() - 3600)) < 60 and nonzero >= points - 2
    assert browser.find_element(By.ID, "queue-note").text == "last 1 h, every worker"
