"""The README's playground screenshot: the bundled model served on 127.0.0.1, one seeded generation in headless
chromium, one token inspected.

    .venv/bin/python -m tests.server.playground_screenshot [docs/playground.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

from selenium.webdriver.common.by import By

from server.settings import Settings
from tests.server.browser import chrome
from tests.server.conftest import LiveServer
from tests.server.test_playground import Page

ROOT = Path(__file__).resolve().parents[2]


def main(out: Path) -> None:
    settings = Settings.model_validate(dict(device="cpu", dtype="float32", max_batch_size=4))  # the bundled model
    with LiveServer(settings) as server:
        driver = chrome(width=1280, height=1240)
        try:
            page = Page(driver, server.url).open()
            page.wait_loaded("gam-wikitext2")
            page.fill(prompt="The history of the city", temperature=0.8, top_p=0.95, max_new_tokens=96, seed=42)
            page.generate()
            page.wait_finished()
            driver.find_elements(By.CSS_SELECTOR, "#output .tok")[6].click()
            driver.execute_script("window.scrollTo(0, 0)")
            assert page.console_errors() == []
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "playground.png")
