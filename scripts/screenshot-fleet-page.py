#!/usr/bin/env python3
"""Take docs/fleet-page.png: the fleet page in Debian's headless Chromium, signed in with the
quick start's credentials while the demo fleet reports.

    scripts/serve-local.sh                                    # one terminal
    .venv/bin/python -m server demo-fleet --workers 12        # another, a few minutes ahead
    .venv/bin/python scripts/screenshot-fleet-page.py         # then this

Nothing is downloaded: Selenium drives /usr/bin/chromium through /usr/bin/chromedriver
(Debian's chromium and chromium-driver packages).
"""

import argparse
import os
import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.demo import DEFAULT_CREDENTIALS, read_credentials  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH = 1280
MAX_HEIGHT = 1800  # the table, the activity and the first charts


def chromium(width: int, height: int) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    # A path given to the Service: Selenium Manager (which would download) is not run.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def wait_for(condition, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshot-fleet-page: timed out waiting for {what}")
        time.sleep(0.2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('WORKERS_PORT', '8008')}/")
    parser.add_argument("--credentials", default=str(DEFAULT_CREDENTIALS), metavar="FILE")
    parser.add_argument("--output", default=str(ROOT / "docs" / "fleet-page.png"))
    args = parser.parse_args()
    access_key, secret_key = read_credentials(Path(args.credentials))

    driver = chromium(WIDTH, 1000)
    try:
        driver.get(args.url)
        driver.find_element(By.ID, "access-key").send_keys(access_key)
        driver.find_element(By.ID, "secret-key").send_keys(secret_key)
        driver.find_element(By.ID, "sign-in-button").click()

        def charts_drawn():
            figures = driver.find_elements(By.CSS_SELECTOR, "#metric-charts figure")
            return len(figures) >= 4 and all(int(f.get_attribute("data-nonzero") or 0) for f in figures)

        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#workers tbody tr"), "the fleet table")
        wait_for(charts_drawn, "the charts of the selected workers")
        problem = driver.find_element(By.ID, "problem")
        if problem.is_displayed():
            raise SystemExit(f"screenshot-fleet-page: the page shows a problem: {problem.text}")
        height = min(driver.execute_script("return document.documentElement.scrollHeight"), MAX_HEIGHT)
        driver.set_window_size(WIDTH, height)
        time.sleep(1)  # the charts follow the window's size
        driver.save_screenshot(args.output)
    finally:
        driver.quit()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
