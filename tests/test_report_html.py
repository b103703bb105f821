"""report.html of `haprune prune`: written beside report.json, self-contained (figures embedded, no network, no
script), showing what report.json holds; rebuilt by `haprune report RUN_DIR`; readable without matplotlib; and
rendered by a real headless browser (Chromium, skipped with the reason when it is not installed)."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from benchmarks_loader import load_benchmark

from haprune import plots
from haprune.cli import main
from haprune.report_html import render_html
from test_cli import data_dir, trained  # noqa: F401  (the tiny data set and ResNet-20 of the CLI tests)

SECTIONS = ("Before and after", "Per-layer widths", "Sensitivity per layer", "Accuracy through fine-tuning",
            "Latency", "Command and versions")


class _Page(HTMLParser):
    """Collects the tags, <img> sources, every URL-valued attribute and the visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags, self.images, self.urls, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        self.urls += [v for k, v in attrs if k in ("src", "href", "action", "data") and v]

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


@pytest.fixture(scope="module")
def run_dir(data_dir, trained, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("run") / "run"
    code = main([str(a) for a in ("prune", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir,
                                  "--out", out, "--target", "0.4", "--implant-ratio", "0.2", "--finetune-epochs", "2",
                                  "--train-limit", "256", "--calib-batches", "1", "--calib-batch-size", "32",
                                  "--latency-batch", "2", "--latency-repeats", "2", "--no-cache", "--quiet")])
    assert code == 0
    return out


def test_prune_writes_a_self_contained_page_of_its_report(run_dir):
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    report = json.loads((run_dir / "report.json").read_text())
    p = parse(page)
    text = " ".join(p.text)
    assert all(s in text for s in SECTIONS)
    # figures: widths, sensitivity, fine-tuning, latency; every one embedded, nothing fetched, nothing run
    assert len(p.images) == 4 and all(src.startswith("data:image/png;base64,") for src in p.images)
    assert all(u.startswith("data:") for u in p.urls)
    assert not {"script", "link", "iframe", "object"} & set(p.tags)
    # the numbers are report.json's
    assert f"{report['params']['before']:,}" in text and f"{report['params']['after']:,}" in text
    assert f"{100 * report['accuracy']['after_finetune']:.2f}%" in text
    assert f"{report['latency']['before']['median_ms']:.2f}" in text
    assert report["command"].startswith("haprune prune --model resnet20") and report["command"] in text
    assert report["versions"]["torch"] in text
    for g in report["plan"]["groups"]:
        assert g["name"] in text  # the widths table lists every group
    per_group = report["sensitivity"]["per_group"]
    assert set(per_group) == {g["name"] for g in report["plan"]["groups"]}
    assert all(s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"] for s in per_group.values())
    assert [h["epoch"] for h in report["finetune"]["history"]] == [1, 2]


def test_report_command_rebuilds_the_page(run_dir, tmp_path):
    page = (run_dir / "report.html").read_bytes()
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").read_bytes() == page
    assert main(["report", str(tmp_path)]) == 2  # not a run folder: a message, no traceback


def test_page_without_matplotlib_keeps_the_tables_and_says_how_to_get_figures(run_dir, monkeypatch):
    def missing():
        raise plots.PlotsUnavailableError("plots need matplotlib: pip install 'haprune[plots]'")

    monkeypatch.setattr(plots, "require_matplotlib", missing)
    report = json.loads((run_dir / "report.json").read_text())
    p = parse(render_html(report))
    text = " ".join(p.text)
    assert not p.images and "haprune[plots]" in text
    assert all(s in text for s in SECTIONS) and f"{report['params']['after']:,}" in text


def test_the_page_renders_in_headless_chromium(run_dir, tmp_path):
    shots = load_benchmark("report_screenshots")
    if shots.chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); `make check-report` needs it too")
    png = shots.screenshot(run_dir / "report.html", tmp_path / "page.png", width=1000, height=1800)
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pixels.shape == (1800, 1000, 3)
    # the figures were decoded and drawn: the kept-channel blue of the widths plot (#0072B2) covers a real area
    blue = (np.abs(pixels - np.array([0, 114, 178])).sum(axis=2) < 30).sum()
    assert blue > 2000, blue
    assert pixels.std() > 20  # not a blank page
