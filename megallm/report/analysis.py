"""What happened in a run: spikes, skips, rollbacks, recovery, and whether spikes cluster.

Metrics are kept in execution order. After a rollback the iteration numbers restart from the
checkpoint, so "the timeline" (one point per iteration, the later line wins) and "the steps
executed" (every line) are different things; each function says which it uses.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

# Recovery rule: a spike has recovered at the first later step that was applied (not skipped) with
# a finite loss at or under loss_mean + RECOVERY_SIGMAS * loss_std of the spike's window. Two sigma
# is tighter than the detection threshold (6 sigma), so "recovered" means back to normal noise, not
# merely no longer flagged. Only the upper edge counts: spikes are upward, and training keeps
# lowering the loss, so a loss under the band is recovered too.
RECOVERY_SIGMAS = 2.0


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def timeline(metrics: list[dict]) -> list[dict]:
    """One record per iteration, sorted; a line re-run after a rollback replaces the first pass."""
    latest = {}
    for r in metrics:
        latest[r["iteration"]] = r
    return [latest[i] for i in sorted(latest)]


def rollbacks(metrics: list[dict], events: list[dict], spikes: list[dict]) -> list[dict]:
    """Rollbacks from events.jsonl, else inferred where iteration numbers go back in metrics."""
    found = []
    for e in events:
        if e.get("event") == "rollback":
            found.append({k: e.get(k) for k in ("iteration", "to_iteration", "checkpoint", "spike_iterations",
                                                 "consumed_samples_before", "consumed_samples_after")})
    if not found:
        for prev, cur in zip(metrics, metrics[1:]):
            if cur["iteration"] <= prev["iteration"]:
                lo, hi = cur["iteration"] - 1, prev["iteration"]
                found.append({"iteration": hi, "to_iteration": lo, "checkpoint": None, "inferred": True,
                              "spike_iterations": sorted({s["iteration"] for s in spikes if lo < s["iteration"] <= hi}),
                              "consumed_samples_before": prev.get("consumed_samples"),
                              "consumed_samples_after": None})
    # Samples the rollback skipped past: where data resumed minus what the checkpoint had consumed.
    for rb in found:
        at_ckpt = 0 if rb.get("to_iteration") == 0 else None
        for r in metrics:
            if r["iteration"] == rb.get("to_iteration") and r.get("consumed_samples") is not None:
                at_ckpt = r["consumed_samples"]
                break
        after = rb.get("consumed_samples_after")
        rb["skipped_samples"] = after - at_ckpt if after is not None and at_ckpt is not None else None
    return found


def match_spikes(metrics: list[dict], spikes: list[dict]) -> list[Optional[int]]:
    """Index into metrics of each spike's own step. Both files are in execution order, so a cursor
    pairs a spike with the next line of its iteration (a re-run iteration gets the later line)."""
    positions, cursor = [], 0
    for s in spikes:
        hit = next((j for j in range(cursor, len(metrics)) if metrics[j]["iteration"] == s["iteration"]), None)
        positions.append(hit)
        if hit is not None:
            cursor = hit + 1
    return positions


def recovery(metrics: list[dict], position: Optional[int], spike: dict) -> dict:
    """Steps executed after the spike until the loss is back within 2 sigma of the detector's
    center: its logged z-score at that step (which follows the loss trend and a rollback's restored
    window), or, where no z was logged, the band at the spike (center + 2 sigma)."""
    mean, std = spike.get("loss_mean"), spike.get("loss_std")
    if not (finite(mean) and finite(std)):
        return {"recovery_threshold": None, "recovery_iters": None,
                "recovery_note": "no window statistics (spike before the window filled?)"}
    threshold = mean + RECOVERY_SIGMAS * std
    out = {"recovery_threshold": threshold, "recovery_iters": None}
    if position is None:
        out["recovery_note"] = "the spike's own step is not in metrics.jsonl"
        return out
    for j in range(position + 1, len(metrics)):
        r = metrics[j]
        z = r.get("loss_zscore")
        back = z <= RECOVERY_SIGMAS if finite(z) else finite(r.get("loss")) and r["loss"] <= threshold
        if not r.get("skipped") and finite(r.get("loss")) and back:
            out["recovery_iters"] = j - position
            out["recovered_at"] = r["iteration"]
            return out
    out["recovery_note"] = f"not back under {threshold:.4g} by the end of the log"
    return out


def severity(spike: dict) -> float:
    """Largest |z| of the spike; non-finite loss or grad norm ranks above any z-score."""
    if not finite(spike.get("loss")) or (spike.get("grad_norm") is not None and not finite(spike["grad_norm"])):
        return math.inf
    zs = [abs(spike[k]) for k in ("loss_zscore", "grad_zscore") if finite(spike.get(k))]
    return max(zs, default=0.0)


def largest_zscores(metrics: list[dict], n: int = 5) -> dict:
    out = {}
    for key in ("loss_zscore", "grad_zscore"):
        points = [(r[key], r["iteration"]) for r in metrics if finite(r.get(key))]
        points.sort(key=lambda p: -abs(p[0]))
        out[key] = [{"iteration": it, "zscore": z} for z, it in points[:n]]
    return out


def time_clustering(spike_iterations: list[int], window: int, span: int) -> dict:
    """Do spikes come in bursts? Count gaps between consecutive spike iterations within `window`
    (spike_skip_window) against what n spikes spread uniformly over `span` iterations would give:
    gaps of a uniform (Poisson) process are exponential with mean span/n, so a fraction
    1 - exp(-n * window / span) of them is expected to be that short."""
    its = sorted(set(spike_iterations))
    n = len(its)
    result = {"window": window, "spike_iterations": its, "gaps": [], "close_gaps": 0,
              "observed_fraction": None, "expected_fraction": None, "clusters": [], "clustered": False,
              "verdict": "fewer than two spikes"}
    if n < 2 or span <= 0:
        return result
    gaps = [b - a for a, b in zip(its, its[1:])]
    close = sum(g <= window for g in gaps)
    expected = 1.0 - math.exp(-n * window / span)
    clusters, current = [], [its[0]]
    for it, gap in zip(its[1:], gaps):
        if gap <= window:
            current.append(it)
        else:
            if len(current) > 1:
                clusters.append(current)
            current = [it]
    if len(current) > 1:
        clusters.append(current)
    observed = close / len(gaps)
    # When uniform spikes would already sit within the window more often than not (a window wide
    # for the run, or many spikes), closeness says nothing: no verdict rather than a false one.
    if expected >= 0.5:
        verdict, clustered = "cannot tell (spike_skip_window is wide for this many spikes in this run)", False
    else:
        clustered = bool(clusters) and observed > expected
        verdict = "clustered" if clustered else "not clustered"
    result.update(gaps=gaps, close_gaps=close, observed_fraction=observed, expected_fraction=expected,
                  clusters=clusters, clustered=clustered, verdict=verdict)
    return result


def _document_keys(entry: dict) -> list[tuple[tuple, Optional[str]]]:
    """(dataset, document id) keys of one sample's provenance, each with its source if aligned."""
    docs = entry.get("documents") or []
    sources = entry.get("sources") or []
    aligned = len(sources) == len(docs)
    return [((entry.get("dataset"), d), sources[i] if aligned else None) for i, d in enumerate(docs)]


def document_clustering(spikes: list[dict], min_spikes: int = 2) -> dict:
    """Documents and samples that sit in the batches of at least `min_spikes` different spikes."""
    doc_spikes, doc_sources, doc_samples = defaultdict(set), {}, defaultdict(int)
    sample_spikes = defaultdict(set)
    with_docs = 0
    for index, s in enumerate(spikes):
        for sample in s.get("samples") or []:
            sample_spikes[sample].add(index)
        # Synthetic data logs an entry per sample with no documents: that is no provenance.
        if not any(entry.get("documents") for entry in s.get("documents") or []):
            continue
        with_docs += 1
        for entry in s["documents"]:
            for key, source in _document_keys(entry):
                doc_spikes[key].add(index)
                doc_samples[key] += 1
                if source:
                    doc_sources[key] = source
    # "samples": how many samples of those batches hold the document. A long document spans many
    # samples and so reaches many batches by chance; one short document in k spikes does not.
    repeated = [{"dataset": key[0], "document": key[1], "source": doc_sources.get(key), "spikes": len(idx),
                 "samples": doc_samples[key], "iterations": sorted({spikes[i]["iteration"] for i in idx})}
                for key, idx in doc_spikes.items() if len(idx) >= min_spikes]
    repeated.sort(key=lambda d: (-d["spikes"], str(d["dataset"]), str(d["document"])))
    samples = [{"sample": k, "spikes": len(v), "iterations": sorted({spikes[i]["iteration"] for i in v})}
               for k, v in sample_spikes.items() if len(v) >= min_spikes]
    samples.sort(key=lambda d: (-d["spikes"], d["sample"]))
    return {"spikes_with_documents": with_docs, "repeated_documents": repeated, "repeated_samples": samples}


def mark_repeated_documents(rows: list[dict], repeated: list[dict]) -> None:
    """Give each spike row `repeated_documents`: labels of its documents that sit in other spikes'
    batches too, so the table can show them first (a batch holds many documents; these matter)."""
    keys = {(d["dataset"], d["document"]): d for d in repeated}
    for row in rows:
        labels = []
        for entry in row.get("documents") or []:
            for key, source in _document_keys(entry):
                if key in keys:
                    labels.append(f"{source or f'{key[0]}:{key[1]}'} (in {keys[key]['spikes']} spikes)")
        row["repeated_documents"] = labels


def batch_sources(spike: dict) -> list[str]:
    """file:line of every document in the spike's batch (provenance), in batch order, unique."""
    seen, out = set(), []
    for entry in spike.get("documents") or []:
        for source in entry.get("sources") or []:
            if source not in seen:
                seen.add(source)
                out.append(source)
    return out


def token_accounting(metrics: list[dict], default_tokens_per_step: Optional[int]) -> dict:
    """Tokens of every executed step and of the skipped ones (a skipped step's tokens are lost)."""
    total = skipped = 0
    for r in metrics:
        gbs, seq = r.get("global_batch_size"), r.get("seq_length")
        tokens = gbs * seq if gbs and seq else default_tokens_per_step
        if tokens is None:
            return {"total_tokens": None, "skipped_tokens": None, "skipped_token_share": None}
        total += tokens
        skipped += tokens if r.get("skipped") else 0
    return {"total_tokens": total, "skipped_tokens": skipped,
            "skipped_token_share": skipped / total if total else None}
