"""Render report.html pages in a real browser (headless Chromium, Debian package ``chromium``) and save screenshots.

The check of issue 17 that the page is seen as a user sees it: one self-contained file, opened from disk with no
network. Used by tests/test_report_html.py (skipped without Chromium) and by ``make check-report``, which writes the
screenshots the README shows from the runs of benchmarks/explore_cost.py:

    python benchmarks/report_screenshots.py      # docs/images/report_page.png, docs/images/explore_page.png
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {  # run folder of benchmarks/explore_cost.py -> screenshot
    ROOT / "runs" / "explore_cost" / "prune-picked": ROOT / "docs" / "images" / "report_page.png",
    ROOT / "runs" / "explore_cost" / "explore-l2": ROOT / "docs" / "images" / "explore_page.png",
}


def chromium() -> str | None:
    """The Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400, timeout: float = 120) -> Path:
    """Open ``page`` in headless Chromium (network off) and save a ``width`` x ``height`` screenshot to ``png``."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found: apt-get install chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout, env={**os.environ, "HOME": profile})
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {page}")
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args()
    for folder, png in PAGES.items():
        page = folder / "report.html"
        if not page.is_file():
            raise SystemExit(f"{page} not found: run python benchmarks/explore_cost.py first")
        print(f"{screenshot(page, png, height=args.height)}")


if __name__ == "__main__":
    main()
