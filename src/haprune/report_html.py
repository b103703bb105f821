"""report.html: one self-contained page per run, rendered from the run's JSON (``report.json`` of ``haprune prune``,
``explore.json`` of ``haprune explore``).

The page needs nothing else: styles inline, figures embedded as base64 PNG (drawn by :mod:`haprune.plots`), no
script and no network. Without matplotlib the page still has every table and says how to get the figures.
:func:`render_html` returns the page, :func:`write_html` writes it atomically; ``haprune report RUN_DIR`` rebuilds
it from the JSON alone.
"""
from __future__ import annotations

import html
import json
import os
from typing import Any, Callable, Mapping, Sequence

from ._fileio import atomic_write_text

__all__ = ["render_html", "write_html", "explore_figure", "short_names"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1180px;
color:#1d1d1f;padding:0 16px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{border:1px solid #d6d6d6;padding:4px 9px;text-align:right}th{background:#f3f4f6}
td.l,th.l{text-align:left}img{max-width:100%;height:auto;display:block;margin:8px 0}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:.88em;white-space:pre-wrap;word-break:break-all}
.warn{background:#fff4e5;border-left:4px solid #e69f00;padding:6px 10px;margin:6px 0}
.note{color:#555;font-size:.9em}details{margin:8px 0}summary{cursor:pointer;color:#0072b2}
.good{color:#007a3d}.bad{color:#b00020}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns left-aligned; cells are escaped."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_e(c)}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def short_names(names: Sequence[str]) -> list[str]:
    """``names`` without the longest dotted prefix they all share (each keeps at least one component)."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


class _Figures:
    """Draws figures into ``<img>`` tags; remembers whether matplotlib was missing (said once on the page)."""

    def __init__(self) -> None:
        self.missing: str | None = None

    def img(self, draw: Callable[[], Any], alt: str) -> str:
        from .plots import PlotsUnavailableError, data_uri

        if self.missing:
            return ""
        try:
            return f'<img alt="{_e(alt)}" src="{data_uri(draw())}">'
        except PlotsUnavailableError as e:
            self.missing = str(e)
            return ""


def _widths_figure(groups: Sequence[Mapping[str, Any]], title: str):
    from .plots import WIDTH_COLOURS, stacked_bar_plot

    names = short_names([g["name"] for g in groups])
    stacks = {"kept": [g["kept"] for g in groups], "implanted": [g["implanted"] for g in groups],
              "removed": [g["removed"] for g in groups]}
    return stacked_bar_plot(names, stacks, title=title, xlabel="group (root module)", ylabel="channels",
                            colours=WIDTH_COLOURS)


def _sensitivity_figure(per_group: Mapping[str, Mapping[str, float]], criterion: str):
    from .plots import box_plot

    names = short_names(list(per_group))
    return box_plot(dict(zip(names, per_group.values())), title=f"sensitivity of each group's structures "
                    f"({criterion}): min, quartiles, max", xlabel="group (root module)", ylabel="score (log)")


def _sensitivity_section(sens: Mapping[str, Any], figs: _Figures) -> str:
    per_group = sens.get("per_group") or {}
    out = ["<h2>Sensitivity per layer</h2>"]
    info = sens.get("info") or {}
    why = (info.get("auto") or {}).get("why")
    out.append(f'<p class="note">criterion <b>{_e(sens.get("criterion"))}</b>'
               + (f" (auto: {_e(why)})" if why else "")
               + (f"; {info.get('samples')} calibration samples in {info.get('seconds')} s" if info.get("samples") else "")
               + (f"; cached pass reused ({_e((sens.get('cache') or {}).get('key'))})"
                  if (sens.get("cache") or {}).get("reused") or sens.get("reused") else "") + "</p>")
    if per_group:
        out.append(figs.img(lambda: _sensitivity_figure(per_group, str(sens.get("criterion"))),
                            "sensitivity distribution per layer"))
        rows = [[n, s["n"], _num(s["min"]), _num(s["median"]), _num(s["max"])] for n, s in per_group.items()]
        out.append("<details><summary>scores per group (table)</summary>"
                   + _table(["group", "structures", "min", "median", "max"], rows) + "</details>")
    else:
        out.append('<p class="note">this report.json has no per-layer scores (written before they were recorded)</p>')
    return "\n".join(out)


def _footer(result: Mapping[str, Any]) -> str:
    versions = result.get("versions") or {}
    out = ["<h2>Command and versions</h2>"]
    if result.get("command"):
        out.append(f"<pre>{_e(result['command'])}</pre>")
    out.append(_table(["software", "version"], [[k, v] for k, v in versions.items()]))
    ts = result.get("timestamps") or {}
    out.append(f'<p class="note">started {_e(ts.get("started"))}, finished {_e(ts.get("finished"))} '
               f'({_e(ts.get("seconds"))} s); run {_e(result.get("run_id"))}</p>')
    settings = result.get("settings") or {}
    out.append("<details><summary>all settings</summary><pre>"
               + _e(json.dumps(settings, indent=1, default=str)) + "</pre></details>")
    return "\n".join(out)


def _page(title: str, subtitle: str, body: list[str], figs: _Figures) -> str:
    if figs.missing:
        body.insert(0, f'<p class="warn">Figures left out: {_e(figs.missing)}. Then run <code>haprune report '
                       f'RUN_DIR</code> again.</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n<p class=\"sub\">{_e(subtitle)}</p>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _warnings(result: Mapping[str, Any]) -> str:
    items = list(result.get("warnings") or []) + [f"plan: {n}" for n in result.get("plan_notes") or []]
    return "\n".join(f'<p class="warn">{_e(w)}</p>' for w in items)


# ---------------------------------------------------------------------------------------------------- prune

def _prune_page(r: Mapping[str, Any]) -> str:
    figs = _Figures()
    model, plan, acc, lat = r["model"], r["plan"], r["accuracy"], r["latency"]
    p, f = r["params"], r["flops"]
    body = [_warnings(r), "<h2>Before and after</h2>"]

    def change(a: float | None) -> str:
        return "-" if a is None or acc.get("before") is None else f"{100 * (a - acc['before']):+.2f} pp"

    rows = [["parameters", _num(p["before"]), _num(p["after"]), f"-{_pct(p['removed'])}"],
            ["FLOPs (MACs per sample)", _num(f["before"]), _num(f["after"]), f"-{_pct(f['removed'])}"],
            ["test accuracy, one-shot", _pct(acc.get("before")), _pct(acc.get("after_oneshot")),
             change(acc.get("after_oneshot"))],
            ["test accuracy, fine-tuned", _pct(acc.get("before")), _pct(acc.get("after_finetune")),
             change(acc.get("after_finetune"))]]
    before, after = lat.get("before") or {}, lat.get("after") or {}
    if before and after:
        rows.append(["CPU latency, median ms", f"{before['median_ms']:.2f}", f"{after['median_ms']:.2f}",
                     f"{lat['speedup']:.2f}x faster" if lat.get("speedup") else "-"])
    body.append(_table(["", "before", "after", "change"], rows))
    deployed = r.get("deployed") or {}
    if deployed.get("merged_implants"):
        body.append(f'<p class="note">latency and model.onnx run the deployment form: {deployed["merged_implants"]} '
                    f'implanted layers merged ({_num(deployed.get("params"))} parameters, '
                    f'{_num(deployed.get("flops"))} MACs).</p>')
    c = plan["counts"]
    body.append(f'<p class="note">plan: {_e(plan.get("budget"))} budget, target {_pct(plan.get("target"), 1)}; '
                f'structures {c["kept"]} kept, {c["implanted"]} implanted, {c["removed"]} removed.</p>')

    body.append("<h2>Per-layer widths</h2>")
    groups = plan.get("groups") or []
    body.append(figs.img(lambda: _widths_figure(groups, "channels kept / implanted / removed per group"),
                         "per-layer widths"))
    body.append("<details><summary>widths per group (table)</summary>"
                + _table(["group", "size", "kept", "implanted", "removed"],
                         [[g["name"], g["size"], g["kept"], g["implanted"], g["removed"]] for g in groups])
                + "</details>")

    body.append(_sensitivity_section(r.get("sensitivity") or {}, figs))

    body.append("<h2>Accuracy through fine-tuning</h2>")
    ft = r.get("finetune")
    if ft and ft.get("history"):
        hist = ft["history"]

        def draw():
            from .plots import line_plot

            series = {"validation accuracy": [(h["epoch"], 100 * h["val_accuracy"], 0) for h in hist]}
            return line_plot(series, title="fine-tuning", xlabel="epoch", ylabel="accuracy (%)",
                             hline=(f"dense (test) {100 * acc['before']:.2f}%", 100 * acc["before"])
                             if acc.get("before") is not None else None, width=6.4, height=4.0)

        body.append(figs.img(draw, "accuracy through fine-tuning"))
        body.append(_table(["epoch", "lr", "train loss", "val loss", "val accuracy", "s"],
                           [[h["epoch"], _num(h["lr"]), _num(h["train_loss"]), _num(h["val_loss"]),
                             _pct(h["val_accuracy"]), _num(h["seconds"])] for h in hist]))
        if ft.get("resumed_from_epoch"):
            body.append(f'<p class="note">resumed from epoch {ft["resumed_from_epoch"]}</p>')
    else:
        body.append('<p class="note">not fine-tuned (one-shot run: --finetune-epochs 0)</p>')

    body.append("<h2>Latency</h2>")
    if before and after:
        def draw_latency():
            from .plots import bar_plot

            values = {"dense": before["median_ms"], "pruned": after["median_ms"]}
            errors = {"dense": (before["p10_ms"], before["p90_ms"]), "pruned": (after["p10_ms"], after["p90_ms"])}
            return bar_plot(values, errors=errors, title="CPU latency per batch (median, p10-p90)", ylabel="ms")

        body.append(figs.img(draw_latency, "latency before and after"))
        s = r.get("settings") or {}
        body.append(f'<p class="note">batch {_e(s.get("latency_batch"))}, threads {_e(s.get("threads") or "default")}, '
                    f'{_e(s.get("latency_repeats"))} interleaved rounds; '
                    f'median {before["median_ms"]:.2f} ms -> {after["median_ms"]:.2f} ms</p>')
    if r.get("compensation"):
        body.append("<details><summary>compensation</summary><pre>"
                    + _e(json.dumps(r["compensation"], indent=1, default=str)) + "</pre></details>")
    body.append(_footer(r))
    title = f"haprune prune: {model.get('name')} on {model.get('dataset')}"
    sub = f"{_pct(p['removed'], 1)} of parameters and {_pct(f['removed'], 1)} of FLOPs removed; run {r.get('run_id')}"
    return _page(title, sub, body, figs)


# ---------------------------------------------------------------------------------------------------- explore

def explore_figure(result: Mapping[str, Any]):
    """Accuracy against params / FLOPs / latency remaining of an explore result, one line per criterion."""
    from .plots import tradeoff_plot

    curves: dict[str, list[dict[str, Any]]] = {}
    for point in result["points"]:
        if point.get("error"):
            continue
        curves.setdefault(point["label"], []).append({
            "params": point["params"]["remaining"], "flops": point["flops"]["remaining"],
            "latency": (point.get("latency") or {}).get("remaining"), "accuracy": point["accuracy"],
            "target": point["target"]})
    model = result.get("model") or {}
    ev = result.get("evaluation") or {}
    how = "compensated" if ev.get("compensate", "none") != "none" else "BatchNorm re-estimated"
    return tradeoff_plot(curves, dense_accuracy=result["dense"]["accuracy"],
                         title=f"{model.get('name')} on {model.get('dataset')}: one-shot validation accuracy "
                               f"({how}), {result.get('budget')} targets",
                         ylabel="validation accuracy, one-shot (%)")


def _explore_page(r: Mapping[str, Any]) -> str:
    figs = _Figures()
    model, dense = r["model"], r["dense"]
    body = [_warnings(r)]
    ev = r.get("evaluation") or {}
    body.append("<h2>Accuracy against size and speed</h2>")
    body.append(figs.img(lambda: explore_figure(r), "accuracy against parameters, FLOPs and latency remaining"))
    body.append(f'<p class="note">one-shot: planned, pruned and '
                f'{"compensated" if ev.get("compensate", "none") != "none" else "BatchNorm re-estimated"}, '
                f'no fine-tuning; evaluated on {_e(ev.get("images"))} images of the validation split (not the test '
                f'split, so choosing here does not fit the test set). Latency: CPU, deployment form, each point timed '
                f'against the dense model in interleaved rounds.</p>')
    rows = [["dense", "-", _pct(dense["accuracy"]), _num(dense["params"]), "100.00%", _num(dense["flops"]),
             "100.00%", _num((dense.get("latency") or {}).get("median_ms")), "100.00%", "-"]]
    for p in r["points"]:
        if p.get("error"):
            rows.append([p["label"], _pct(p["target"], 0), "unreachable", "", "", "", "", "", "", p["error"][:80]])
            continue
        lat = p.get("latency") or {}
        rows.append([p["label"], _pct(p["target"], 0), _pct(p["accuracy"]), _num(p["params"]["after"]),
                     _pct(p["params"]["remaining"]), _num(p["flops"]["after"]), _pct(p["flops"]["remaining"]),
                     _num(lat.get("pruned_ms")), _pct(lat.get("remaining")), f'{p["seconds"]:.1f}'])
    body.append(_table(["criterion", "target", "val accuracy", "params", "params left", "FLOPs", "FLOPs left",
                        "latency ms", "latency left", "s"], rows))
    out = _e(r.get("settings", {}).get("out") or "EXPLORE_DIR")
    first = r["labels"][0] if r.get("labels") else ""
    picks = [p["target"] for p in r["points"] if p["label"] == first and not p.get("error")]
    if picks:
        body.append(f"<p>Fine-tune a point (the sensitivity pass is reused, not recomputed):</p>"
                    f"<pre>haprune prune --from-explore {out} --pick {picks[len(picks) // 2]:g} --out RUN_DIR</pre>")

    body.append("<h2>Per-layer widths at each target</h2>")
    points = [p for p in r["points"] if p["label"] == first and not p.get("error")]
    if points:
        names = list(points[0]["widths"])

        def draw_widths():
            from .plots import line_plot

            series = {f"{100 * p['target']:g}% ({p['label']})": [
                (i, p["widths"][n][0] - p["widths"][n][1] - p["widths"][n][2], 0) for i, n in enumerate(names)]
                for p in points}
            return line_plot(series, title="channels kept per group (network order of the pruning graph)",
                             xlabel="group index", ylabel="channels kept", width=9.0, height=4.2)

        body.append(figs.img(draw_widths, "channels kept per group at each target"))
        short = short_names(names)
        body.append("<details><summary>widths per group (kept / implanted / removed of size)</summary>" + _table(
            ["group", "size"] + [f"{100 * p['target']:g}%" for p in points],
            [[s, points[0]["widths"][n][0]] + [f"{p['widths'][n][0] - p['widths'][n][1] - p['widths'][n][2]} / "
                                               f"{p['widths'][n][2]} / {p['widths'][n][1]}" for p in points]
             for s, n in zip(short, names)]) + "</details>")
    sens = dict(r.get("sensitivity") or {})
    body.append(_sensitivity_section(sens, figs))
    body.append(_footer(r))
    title = f"haprune explore: {model.get('name')} on {model.get('dataset')}"
    how = "reused from the cache" if sens.get("reused") else f"computed in {sens.get('seconds')} s"
    targets = ", ".join(f"{100 * t:g}%" for t in r.get("targets") or [])
    sub = (f"{len(r['points'])} one-shot points ({', '.join(r.get('labels') or [])}) at {targets} of the "
           f"{r.get('budget')}; sensitivity {how}")
    return _page(title, sub, body, figs)


# ---------------------------------------------------------------------------------------------------- entry points

def render_html(result: Mapping[str, Any]) -> str:
    """The page of ``result``: an explore result (``kind == "explore"``) or a report.json of ``haprune prune``."""
    if not isinstance(result, Mapping):
        raise TypeError(f"a report is a JSON object, got {type(result).__name__}")
    return _explore_page(result) if result.get("kind") == "explore" else _prune_page(result)


def write_html(path: str | os.PathLike[str], result: Mapping[str, Any]) -> None:
    """Write :func:`render_html` of ``result`` to ``path`` atomically."""
    atomic_write_text(path, render_html(result))
