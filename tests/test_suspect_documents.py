"""The must-show of per-document losses: 40 junk documents of four kinds planted at random lines of
the first 8 Shakespeare plays (tests/junk_corpus.py), preprocessed, one pass of the tiny model over
the whole of it on 8 ranks (tp 2 x pp 2 x dp 2), and the report names them by file:line.

Measured rates per kind and the run time are in docs/spike_report.md ("Suspect documents"); the
floors below are the issue's (>= 90% of planted documents, <= 1% of clean ones), per kind they are
what one pass of this tiny model can do (see there for the kinds it misses)."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from tests.junk_corpus import KINDS, build_and_train
from tests.launch import ROOT

pytestmark = pytest.mark.slow

PLAYS, PER_KIND = 8, 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_and_train(tmp_path_factory.mktemp("junk"), PLAYS, PER_KIND, {})


def test_planted_documents_are_the_suspects(trained):
    from megallm.report import build_report

    assert "error" not in trained["run"], trained["run"].get("error")
    planted, clean = trained["planted"], trained["clean"]
    assert len(planted) == PER_KIND * len(KINDS) and len(clean) > 500
    report = build_report(trained["log_dir"])
    named = {d["source"] for d in report["suspect_documents"]}
    found = Counter(planted[s] for s in named if s in planted)
    false = sorted(named - set(planted))
    rates = {k: found[k] / PER_KIND for k in KINDS}
    print(f"found {sum(found.values())}/{len(planted)} {rates}; clean flagged {len(false)}/{len(clean)} {false}")
    assert sum(found.values()) >= 0.9 * len(planted), rates
    assert len(false) <= 0.01 * len(clean), false
    # every kind mostly found; measured (two runs, 2026-12-03): random_ids 9/10, repeated 9/10,
    # other_script 10/10, bytes_as_text 10/10, no clean document flagged
    assert min(rates.values()) >= 0.8, rates
    # the junk ranks first: the most evidence belongs to planted documents
    top = [d["source"] for d in report["suspect_documents"][:10]]
    assert sum(s in planted for s in top) >= 9, top


def test_report_cli_lists_and_skips_the_suspects(trained, tmp_path):
    log_dir = trained["log_dir"]
    skip = tmp_path / "skip.txt"
    proc = subprocess.run([sys.executable, "tools/spike_report.py", str(log_dir), "--out-dir", str(tmp_path / "r"),
                           "--json", "--skip-list", str(skip), "--skip-list-from", "suspects"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    docs = report["suspect_documents"]
    assert docs and all({"source", "document", "occurrences", "max_abs_z"} <= set(d) for d in docs)
    assert [d["evidence"] for d in docs] == sorted((d["evidence"] for d in docs), reverse=True)
    listed = {int(line) for line in skip.read_text().splitlines() if line and not line.startswith("#")}
    assert listed == {s for d in docs for s in d["samples"]}
    assert report["skip_list"]["suspect_documents"] == len(docs)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Suspect documents" in html and 'id="suspects"' in html
