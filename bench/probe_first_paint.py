"""First paint of every page, this checkout beside an older commit, in headless Chromium on cold servers.

    python -m bench.probe_first_paint --before 68fb798            # 3 rounds; writes nothing, prints a table
    python -m bench.probe_first_paint --before 68fb798 --rounds 5 --out /tmp/first_paint.json

The older commit is checked out with `git worktree` in a temporary folder (removed afterwards). Each round starts
one server per checkout, in turn, and visits every page with a fresh browser (empty HTTP cache), the server's
first visit being the overview; per page: seconds until its title is painted (`title`: the first paint), until
its last section's text is on screen (`content`) and until the script run has finished (`done`: the app's
`data-test-script-state` is "notRunning"). Medians over the rounds.
Pages the older commit does not have are measured on this checkout only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.browser import chromium, streamlit_server
from bench.common import REPO

PAGES = {  # url path -> (the page's title, a text the page shows once its last section has rendered)
    "": ("Overview", "Explore"),
    "training_curves": ("Training curves", "Best epochs"),
    "caption_quality": ("Caption quality", "Samples"),
    "query_strategies": ("Query strategies", "All held-out products"),
    "compare_captions": ("Compare captions", "One product"),
    "search_demo": ("Search demo", "fused in"),  # the hybrid column, the last of the gallery product's results
}
KEYS = ("title", "content", "done")


def visit(driver, url: str, title: str, marker: str, timeout: float = 180) -> dict:
    """{title, content, done} seconds from opening the page."""
    driver.get("about:blank")
    start = time.perf_counter()
    driver.get(url)
    seen: dict[str, float] = {}
    while time.perf_counter() - start < timeout:
        heading, text, state = driver.execute_script(
            "const app = document.querySelector('[data-testid=\"stApp\"]'), h1 = document.querySelector('h1');"
            "return [h1 ? h1.innerText : '', document.body.innerText,"
            " app ? app.getAttribute('data-test-script-state') : null]")
        now = round(time.perf_counter() - start, 2)
        if title in heading:
            seen.setdefault("title", now)
        if marker in text:
            seen.setdefault("content", now)
        if "content" in seen and state == "notRunning":  # Streamlit's own test attribute: the run has ended
            return {**seen, "done": now}
        time.sleep(0.05)
    raise TimeoutError(f"{marker!r} did not appear on {url} within {timeout:.0f} s")


def one_round(checkout: Path) -> dict[str, dict | None]:
    out: dict[str, dict | None] = {}
    with streamlit_server(checkout=checkout) as base:
        for path, (title, marker) in PAGES.items():
            if path and not (checkout / "pages" / f"{path}.py").is_file():
                out[path] = None  # not a page of that commit
                continue
            with chromium() as driver:
                out[path or "overview"] = visit(driver, f"{base}/{path}", title, marker)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a git commit to compare with (e.g. 68fb798)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="first-paint-") as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            rounds: dict[str, list[dict]] = {"before": [], "now": []}
            for _ in range(args.rounds):
                rounds["before"].append(one_round(old))
                rounds["now"].append(one_round(REPO))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, capture_output=True)

    def median(which: str, page: str, key: str) -> float | None:
        values = [r[page][key] for r in rounds[which] if r.get(page) and key in r[page]]
        return round(statistics.median(values), 2) if values else None

    table = {page or "overview": {f"{which}_{key}": median(which, page or "overview", key)
                                  for which in ("before", "now") for key in KEYS}
             for page in PAGES}
    print("| page | " + " | ".join(f"{k} {w}" for k in KEYS for w in ("before", "now"))
          + f" |  (medians of {args.rounds} rounds)")
    print("|---|" + "---:|" * 2 * len(KEYS))
    for page, row in table.items():
        cells = [row[f"{w}_{k}"] for k in KEYS for w in ("before", "now")]
        print(f"| {page} | " + " | ".join("-" if v is None else f"{v:.2f} s" for v in cells) + " |")
    result = {"before": args.before, "rounds": args.rounds, "pages": table, "raw": rounds}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
