#!/usr/bin/env python3
"""Take docs/fleet-page.png: the fleet page in Debian's headless Chromium, signed in with the
quick start's credentials while the demo fleet reports.

    scripts/serve-local.sh                                    # one terminal
    .venv/bin/python -m server demo-fleet --workers 12        # another, a few minutes ahead
    .venv/bin/python scripts/screenshot-fleet-page.py         # then this

Selenium drives /usr/bin/chromium through /usr/bin/chromedriver (Debian's chromium and
chromium-driver packages: `sudo apt-get install chromium chromium-driver`); no browser or
driver is downloaded. Selenium itself is the project's `screenshot` extra: when it is
missing, this script installs it into .venv (`scripts/setup-venv.sh screenshot`) first.
"""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALLED = "WORKERS_SCREENSHOT_SETUP_DONE"  # set for the run after the installation


def _needs() -> None:
    """Chromium and its driver must be there; Selenium is installed into .venv if missing
    (then the script runs again with the venv's python)."""
    missing = [package for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"))
               if not shutil.which(path)]
    if missing:
        raise SystemExit(f"screenshot-fleet-page: {' and '.join(missing)} missing: "
                         f"sudo apt-get install {' '.join(missing)}")
    if importlib.util.find_spec("selenium") is not None:
        return
    if os.environ.get(INSTALLED):
        raise SystemExit(f"screenshot-fleet-page: Selenium is still missing for {sys.executable}")
    print(f"screenshot-fleet-page: no Selenium for {sys.executable}: setting up .venv with it "
          "(scripts/setup-venv.sh screenshot)", file=sys.stderr)
    setup = subprocess.run([str(ROOT / "scripts" / "setup-venv.sh"), "screenshot"],
                           check=True, stdout=subprocess.PIPE, text=True)
    python = setup.stdout.strip().splitlines()[-1]
    os.execve(python, [python, __file__, *sys.argv[1:]], {**os.environ, INSTALLED: "1"})


_needs()
sys.path.insert(0, str(ROOT))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from server.demo import DEFAULT_CREDENTIALS, read_credentials  # noqa: E402

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
