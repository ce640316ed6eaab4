"""The report's `index.html`: figures, definitions, config, provenance, headline numbers.

One self-contained file: inline CSS, no script, no network; images are files beside it linked by
relative name, so the page works opened from disk. Every value is HTML-escaped (run names, prompt
texts and error messages are user data).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape, unescape
from typing import Any

from regionwatch.report.data import RunData
from regionwatch.report.tokens import format_tokens
from regionwatch.snapshot import POSITION_KEY, on_tokens_axis
from regionwatch.version import VERSION

DIGITS = 3  # decimals of the headline numbers: max slopes and AUCs differ in the second
PROVENANCE_ORDER = (
    "source",
    "tokenizer_name",
    "tokenizer_hash",
    "seed",
    "seq_len",
    "n_prompts",
    "n_similar",
    "n_dissimilar",
    "n_triples",
    "windows",
    "stream_tokens",
    "stream_sha256",
    "stream_truncated",
    "pairs_reuse_random",
    "regionwatch_version",
)
NAMED_KEYS = ("named_kept", "named_dropped")  # shown as their own table, not as raw JSON

ONSET_DEFINITION = (
    "<b>Emergence onset</b>: the first token count from which the median max slope stays above "
    "the init band for good. The init band is the interquartile range (q25 to q75) of the "
    "pairs' max slopes at initialization: the run's step-0 snapshot or, for a run that starts "
    "later (a replay without the step-0 checkpoint), the step-0 snapshot of the live run it "
    "names (<code>live_run</code>; same probe set and settings). Without either there is no "
    "onset, and the page says why: a later snapshot is never taken for the initialization. The "
    "onset is the earliest snapshot whose median exceeds that q75 and after which every later "
    "median does too, so one noisy point does not count. Snapshots of unknown position "
    "(one-off measurements) take no part. Computed by <code>metrics.emergence_onset(tokens, "
    "medians, init_q75)</code> through <code>regionwatch.onset</code>, as TensorBoard's "
    "<code>onset/tokens</code> and <code>regionwatch show</code>; \u201cnot yet\u201d while the "
    "curve has not left the band."
)
ALIGNMENT_DEFINITION = (
    "<b>Semantic alignment</b> (<code>align/auc</code>): how strongly a pair's max slope "
    "predicts that A and B have different top next tokens. It is the AUC (normalized "
    "Mann-Whitney U) of the random pairs' max slopes, pairs whose clean top tokens differ "
    "against pairs whose top tokens agree: the probability that a differing pair has the "
    "larger slope (ties count half). 0.5 = the slope carries no information, 1 = every "
    "boundary crossing changes the prediction (docs/method.md §7.2 claim 7). Computed by "
    "<code>metrics.alignment</code>."
)
MAX_SLOPE_DEFINITION = (
    "<b>Max slope</b>: s = (S - 1) max<sub>k</sub> (r<sub>k+1</sub> - r<sub>k</sub>) of "
    "r = d(&alpha;)/d(1) on a grid of S alphas (docs/method.md §4): 1 for a straight line "
    "(random init), S - 1 for a perfect one-step jump. Comparable only at equal S."
)
SOLID_DEFINITION = (
    "<b>Solid fraction</b> (<code>maps/solid_fraction</code>): the share of region-map cells "
    "whose colour lies within 0.1 (per channel) of one anchor's colour, averaged over the "
    "triples; about 0.1 for a smooth gradient, up to 1 for solid regions "
    "(<code>metrics.solid_fraction</code>)."
)

# (record key, column header, formatter) of the headline table.
Column = tuple[str, str, Callable[[Any], str]]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1350px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em;
     margin-top: 1.6em; } h3 { margin-top: 1.2em; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr));
           gap: 0 1.5em; align-items: start; } figure.wide { grid-column: 1 / -1; }
figure { margin: 0.8em 0 1.2em 0; } figure img { max-width: 100%; height: auto;
         border: 1px solid #eee; } figcaption { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
tr.onset td { background: #fff4d6; font-weight: 600; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; }
.definitions p { margin: 0.4em 0; } .muted { color: #777; } code { font-size: 0.95em; }
"""


@dataclass(frozen=True)
class Image:
    """An image file beside the page, with its heading and caption.

    Attributes:
        file: the file name, relative to the page.
        title: a short heading.
        caption: what it shows and how to read it.
        wide: take the page's full width (multi-panel figures); others share a row.

    Title and caption are HTML written by regionwatch (entities such as &alpha;, no user data),
    so they are not escaped.
    """

    file: str
    title: str
    caption: str
    wide: bool = False


@dataclass(frozen=True)
class RunSection:
    """One run's part of the page: its own figures plus its tables.

    Attributes:
        run: the run.
        images: its figures (pairs, region maps).
    """

    run: RunData
    images: Sequence[Image] = field(default_factory=tuple)


def render_page(
    runs: Sequence[RunData],
    overview: Sequence[Image],
    sections: Sequence[RunSection],
    *,
    notes: Sequence[str] = (),
) -> str:
    """The whole `index.html` as a string.

    Args:
        runs: every run in the report.
        overview: figures shared by all runs (max slope, curves, alignment).
        sections: one per run.
        notes: warnings shown above the figures (plain text).

    Returns:
        The HTML document.
    """
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<h1>regionwatch report</h1>",
        f'<p class="muted">{len(runs)} run(s); generated {now} by regionwatch '
        f"{escape(VERSION)} from stored snapshots only. Method: Janiak et al., "
        "<i>Characterizing stable regions in the residual stream of LLMs</i>, arXiv 2409.17113."
        "</p>",
        *(f'<p class="note">{escape(n)}</p>' for n in notes),
        "<h2>Runs</h2>",
        _runs_table(runs),
        _figures(overview),
        *(_section(section) for section in sections),
        '<h2 id="definitions">Definitions</h2><div class="definitions">',
        *(f"<p>{d}</p>" for d in _definitions()),
        "</div>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>regionwatch report: {escape(', '.join(r.name for r in runs))}</title>"
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _definitions() -> tuple[str, ...]:
    return (MAX_SLOPE_DEFINITION, ONSET_DEFINITION, ALIGNMENT_DEFINITION, SOLID_DEFINITION)


def _runs_table(runs: Sequence[RunData]) -> str:
    head = (
        "run",
        "snapshots",
        "tokens seen",
        "alphas S",
        "latest median max slope (q25-q75)",
        "emergence onset",
        "latest align/auc",
        "latest solid fraction",
        "failures",
    )
    rows = []
    for run in runs:
        last = run.records[-1]
        rows.append(
            (
                f'<a href="#run-{escape(run.name)}">{escape(run.label)}</a>',
                str(len(run.records)),
                escape(_tokens_range(run)),
                str(run.config.num_alphas),
                f"{_num(last.get('max_slope/median'))} ({_num(last.get('max_slope/q25'))}"
                f" - {_num(last.get('max_slope/q75'))})",
                escape(run.emergence.describe(format_tokens)),
                _num(last.get("align/auc")),
                _num(last.get("maps/solid_fraction")),
                str(len(run.failures)),
            )
        )
    return _table(head, rows, text_columns=1)


def _section(section: RunSection) -> str:
    run = section.run
    onset = run.onset
    emergence, baseline = run.emergence, run.emergence.baseline
    band = (
        f"init band (max slope q25-q75 at {baseline.origin}): {_num(baseline.q25)} - "
        f"{_num(baseline.q75)}"
        if baseline is not None
        else "no init band"
    )
    what = emergence.describe(format_tokens) if baseline is not None else "none"
    parts = [
        f'<h2 id="run-{escape(run.name)}">Run {escape(run.label)}</h2>',
        f'<p class="muted">{escape(str(run.path))}; run id {escape(run.run_id)}</p>',
        f"<p>Emergence onset: <b>{escape(what)}</b> ({escape(band)}). Latest semantic "
        f"alignment: <b>{_num(run.records[-1].get('align/auc'))}</b> (align/auc; 0.5 = no "
        'information). See <a href="#definitions">definitions</a>.</p>',
    ]
    if baseline is None:
        parts.append(f'<p class="note">No emergence onset: {escape(emergence.why_none)}.</p>')
    parts.append(_figures(section.images))
    parts += [
        "<h3>Headline numbers over tokens</h3>",
        _headline_table(run, onset),
        "<h3>Probe config</h3>",
        _pairs_table(run.config.to_dict()),
        "<h3>Probe set provenance</h3>",
        f"<p>{escape(run.probe_summary)}</p>",
        _pairs_table(_provenance(run.provenance)),
        _named_table(run),
        "<h3>Model and run info</h3>",
        _pairs_table(run.info) if run.info else '<p class="muted">none recorded</p>',
        "<h3>Failed measurements</h3>",
        _failures(run.failures),
    ]
    return "\n".join(parts)


def _headline_table(run: RunData, onset: float | None) -> str:
    columns: tuple[Column, ...] = (
        ("tokens", "tokens seen", format_tokens),
        ("step", "step", str),  # both "unknown" where the position is (see below)
        ("max_slope/q25", "max slope q25", _num),
        ("max_slope/median", "max slope median", _num),
        ("max_slope/q75", "max slope q75", _num),
        ("max_slope/similar_median", "similar median", _num),
        ("max_slope/dissimilar_median", "dissimilar median", _num),
        ("align/auc", "align/auc", _num),
        ("maps/solid_fraction", "solid fraction", _num),
        ("probe_seconds", "probe seconds", _seconds),
    )
    head = "".join(f"<th>{escape(title)}</th>" for _, title, _ in columns)
    rows = []
    for record in run.records:
        placed = on_tokens_axis(record)
        is_onset = onset is not None and placed and record["tokens"] == onset
        cells = "".join(
            "<td>unknown</td>"
            if key in record[POSITION_KEY]
            else f"<td>{escape(fmt(record.get(key)))}</td>"
            if record.get(key) is not None
            else "<td>-</td>"
            for key, _, fmt in columns
        )
        rows.append(
            f'<tr class="snapshot{" onset" if is_onset else ""}" data-step="{record["step"]}" '
            f'data-tokens="{record["tokens"]}" title="{record["tokens"]} tokens">{cells}</tr>'
        )
    note = '<p class="muted">Highlighted: the emergence onset.</p>' if onset is not None else ""
    return f'<table class="headline"><tr>{head}</tr>' + "".join(rows) + "</table>" + note


def _tokens_range(run: RunData) -> str:
    """The tokens seen a run spans, and how many of its snapshots have no place in training."""
    placed = run.tokens
    span = f"{format_tokens(placed[0])} - {format_tokens(placed[-1])}" if placed.size else ""
    unknown = len(run.records) - placed.size
    rest = f"{unknown} of unknown position" if unknown else ""
    return "; ".join(part for part in (span, rest) if part)


def _provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    ordered = {k: provenance[k] for k in PROVENANCE_ORDER if k in provenance}
    rest = {k: v for k, v in provenance.items() if k not in ordered and k not in NAMED_KEYS}
    return {**ordered, **rest}


def _named_table(run: RunData) -> str:
    kept = run.named_pairs
    dropped = run.provenance.get("named_dropped") or []
    if not kept and not dropped:
        return '<p class="muted">No named pairs (S1-S3 / D1-D3 or user pairs).</p>'
    rows = [
        (escape(p["name"]), escape(p["kind"]), "kept", escape(p["text_a"]), escape(p["text_b"]))
        for p in kept
    ]
    rows += [
        (escape(str(d.get("name"))), "", "dropped", escape(str(d.get("reason"))), "")
        for d in dropped
        if isinstance(d, Mapping)
    ]
    head = ("named pair", "kind", "status", "prompt A (or why dropped)", "prompt B")
    return "<h3>Named pairs</h3>" + _table(head, rows, text_columns=len(head))


def _failures(failures: Sequence[Mapping[str, Any]]) -> str:
    if not failures:
        return '<p class="muted">none</p>'
    keys = list(dict.fromkeys(k for f in failures for k in f))
    rows = [tuple(escape(_plain(f.get(k))) for k in keys) for f in failures]
    return _table(tuple(keys), rows, text_columns=len(keys))


def _pairs_table(values: Mapping[str, Any]) -> str:
    rows = [(escape(str(k)), escape(_plain(v))) for k, v in values.items()]
    return _table(("key", "value"), rows, text_columns=2)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], *, text_columns: int) -> str:
    """An HTML table; `rows` hold escaped HTML; the first `text_columns` align left."""

    def cls(i: int) -> str:
        return ' class="text"' if i < text_columns else ""

    header = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{header}</tr>{body}</table>"


def _figures(images: Sequence[Image]) -> str:
    return '<div class="figures">' + "".join(_figure(image) for image in images) + "</div>"


def _figure(image: Image) -> str:
    wide = ' class="wide"' if image.wide else ""
    return (
        f'<figure{wide}><h3>{image.title}</h3><img src="{escape(image.file)}" '
        f'alt="{escape(unescape(image.title))}"><figcaption>{image.caption}</figcaption></figure>'
    )


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{float(value):.{DIGITS}f}"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def _plain(value: Any) -> str:
    """A config or provenance value as text: JSON for containers, str otherwise."""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)
