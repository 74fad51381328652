"""Headless Debian chromium driven by selenium through Debian's chromedriver (`make test` installs both)."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

INSTALL_HINT = "run `make test` (it installs them) or `apt-get install -y chromium chromium-driver`"


def find_chromium() -> tuple[str, str]:
    """(chromium, chromedriver) from PATH; a test that needs them fails, with how to install them, when missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found on PATH: {INSTALL_HINT}", pytrace=False)
    assert browser is not None and driver is not None
    return browser, driver


def chrome(width: int = 1280, height: int = 900, **prefs: Any) -> webdriver.Chrome:
    """A headless chromium with its console log readable (`get_log('browser')`); no download, no network use."""
    browser, driver = find_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root on the development machines and CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for key, value in prefs.items():
        opts.set_capability(key, value)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))
