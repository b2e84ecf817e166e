"""report.html: one self-contained page (inline CSS, the plot as a base64 data URI, no JavaScript),
so it opens from a mail attachment or an air-gapped cluster and has nothing to fail in a browser."""

from __future__ import annotations

import base64
import html as _html

from megallm.report import suspects
from megallm.report.text import COLUMNS, table_rows

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.4em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; vertical-align: top; }
td:last-child, th:last-child, td:nth-child(9) { text-align: left; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
.note { color: #8a4b00; } .evidence { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def _e(x) -> str:
    return _html.escape(str(x))


def _list(items, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return "<ul>" + "".join(f"<li{cls}>{_e(i)}</li>" for i in items) + "</ul>"


def render(report: dict, png: bytes) -> str:
    image = base64.b64encode(png).decode("ascii")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>spike report: {_e(report['log_dir'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Spike report: <code>{_e(report['log_dir'])}</code></h1>",
        f"<p>metrics read from {_e(report['source'])}; config from {_e(report['config_source'] or 'defaults')}</p>",
        "<h2>Summary</h2>", _list(report["summary_lines"]),
    ]
    if report["notes"]:
        parts += ["<h2>What the logs are missing</h2>", _list(report["notes"], "note")]
    parts.append(f'<h2>Loss and grad norm</h2><img id="plot" alt="loss and grad norm over iterations" '
                 f'src="data:image/png;base64,{image}">')
    parts.append(f"<h2>Spikes (top {len(report['top'])} of {len(report['spikes'])}, most severe first)</h2>")
    if report["top"]:
        head = "".join(f"<th>{_e(c)}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in table_rows(report))
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        parts.append(f"<p class=\"evidence\">recovery: {_e(report['recovery_rule'])}</p>")
    else:
        parts.append("<p>No spikes.</p>")
    parts.append(suspects.render_html(report))
    parts.append("<h2>Advice</h2>")
    if report["advice"]:
        parts.append("<ul>" + "".join(
            f"<li>{_e(a['message'])}<br><span class=\"evidence\">evidence: {_e(a['evidence'])}</span></li>"
            for a in report["advice"]) + "</ul>")
    else:
        parts.append("<p>Nothing to change.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
