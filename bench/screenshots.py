"""The README's screenshots: the dashboard on the committed runs, in headless Chromium at 1280 px.

    python -m bench.screenshots          # writes docs/screenshots/*.png (needs chromium + chromium-driver)

Each view is opened from a shareable link (the same URLs a user copies), scrolled to the part shown.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlencode

from bench.browser import chromium, streamlit_server

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "screenshots"
SMALL = REPO.parent / "shared" / "data" / "fashion-product-images-small"
REFERENCE = "reference-cpu"
VIEWS = [  # (file, url path, query parameters, text to wait for, heading to scroll to or None)
    ("compare_captions", "compare_captions",
     {"runs": REFERENCE, "captions": [f"{REFERENCE} · greedy", f"{REFERENCE} · reranked"], "only": "one_right",
      "products": "novel"}, "One product", None),
    ("compare_captions_product", "compare_captions",
     {"runs": REFERENCE, "captions": [f"{REFERENCE} · greedy", f"{REFERENCE} · reranked"], "only": "one_right",
      "products": "novel"}, "One product", "One product"),
    ("caption_quality_by_category", "caption_quality", {"run": REFERENCE}, "Samples", "By category"),
    ("query_strategies_precision_at_k", "query_strategies", {"run": REFERENCE}, "All held-out products",
     "Precision at every cut-off"),
    ("training_curves", "training_curves",
     {"runs": [REFERENCE, "ablation-cpu-flips-wd0.1", "ablation-cpu-ep10", "paper-2024"], "log": "true"},
     "Best epochs", None),
    ("training_curves_differing_arguments", "training_curves",
     {"runs": [REFERENCE, "ablation-cpu-flips-wd0.1", "ablation-cpu-jitter-6layers"]}, "Best epochs", "What differs"),
]


def settle(driver, text: str, timeout: float = 240) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        busy = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
        if text in body and not busy:
            time.sleep(2.0)  # charts and images paint after the last delta
            return
        time.sleep(0.5)
    raise TimeoutError(f"waited {timeout:.0f} s for {text!r}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    env = {"RIS_DATA_DIR": str(SMALL)}  # the committed runs (results/) are always listed
    with streamlit_server(env, timeout=120) as url, chromium() as driver:
        driver.set_window_size(1280, 900)
        for name, path, params, marker, heading in VIEWS:
            driver.get(f"{url}/{path}?{urlencode(params, doseq=True)}")
            settle(driver, marker)
            if heading:
                driver.execute_script(
                    "for (const h of document.querySelectorAll('h1,h2,h3,p,strong')) {"
                    " if (h.textContent.startsWith(arguments[0])) { h.scrollIntoView(); break; } }", heading)
                time.sleep(1.0)
            driver.save_screenshot(str(OUT / f"{name}.png"))
            print(f"{name}.png: {(OUT / f'{name}.png').stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
