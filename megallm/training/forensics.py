"""Per-document losses of every training iteration, and the documents that stand out.

The cross-entropy computes a loss for every token before taking the mean the backward needs. On
the last pipeline stage `loss_fn` hands those per-token losses (detached, no copy) to
`keep_token_losses`, so looking at documents costs no extra forward. After the step, each sample
of this data-parallel rank is cut at its document boundaries (read from megatron's GPTDataset
indices, `sample_segments`), and every document segment gets its mean loss and token count.

A segment is a suspect when its mean loss is far from the other text of the iteration, either way
(random bytes far above, a repeated token far below), or when the spread of its per-token losses
is (text mixes easy and hard tokens; one token repeated or a hex dump is uniformly (un)predictable,
which a young model's mean loss may not show). For each statistic x (the mean, and the log of the
standard deviation of the segment's per-token losses), a robust z:

    z_s = (x_s - median of this iteration's segments) / (1.4826 * MAD)

where MAD is the median absolute deviation of the segments' distances to their own iteration's
median, pooled over the last `suspect_window` iterations (a tiny batch has too few segments for a
scale of its own; centring each iteration on its own median keeps the falling loss out of the
scale), or this iteration's own MAD where that is larger. Nothing is scored before the window is
full: the first iterations' model has not yet told text from noise. Only segments of at least
`suspect_min_tokens` tokens are scored or used as reference: a short segment's statistics are
noise. max(|z|, |z_spread|) > suspect_zscore makes a suspect.

No collective on the critical path: every last-stage rank of tensor-parallel rank 0 (the losses
are the same on every tp rank) scores its own data-parallel share and appends to files of its own,
    <log-dir>/suspects-dp<R>.jsonl        one line per suspect segment
    <log-dir>/segment_losses-dp<R>.jsonl  one line per iteration: quantiles of the segment losses
which the report merges. The only gather is on a spike iteration, where every rank already stops
to decide (`spike_documents`): it brings the batch's segments to rank 0 for spikes.jsonl.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x 1.4826 = its standard deviation
MIN_REFERENCE = 8  # scored segments in the window below which nothing is called a suspect

_kept: Optional[list] = None


@contextlib.contextmanager
def keep_token_losses():
    """Collect the per-token losses loss_fn sees while the block runs (one [mbs, seq] tensor per
    micro-batch, in micro-batch order)."""
    global _kept
    _kept = []
    try:
        yield _kept
    finally:
        _kept = None


def keep(per_token: torch.Tensor) -> None:
    if _kept is not None:
        _kept.append(per_token.detach())


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    sample: int  # dataset sample index
    dataset: str  # the IndexedDataset's path prefix
    document: int  # its sequence id, a row of the provenance sidecar
    start: int  # label positions [start, end) of the sample belong to this document
    end: int


def _resolve(dataset, index: int):
    from megallm.data.provenance import _resolve as resolve

    return resolve(dataset, index)


def sample_segments(dataset, sample: int) -> list[Segment]:
    """The documents of one dataset sample and the label positions each covers.

    GPTDataset builds sample text (seq + 1 tokens) from document parts: the first from its offset
    to its end, whole documents, the last up to its end offset + 1 (see its
    _query_document_sample_shuffle_indices). Label j is text token j + 1, so a part at text
    positions [a, b) owns labels [a - 1, b - 1); the first label of a document is predicted from the
    previous document's end. Padding after the last part belongs to no document."""
    inner, j = _resolve(dataset, int(sample))
    if not hasattr(inner, "sample_index"):  # synthetic data: no documents
        return []
    seq = inner.config.sequence_length
    i = int(inner.shuffle_index[j])
    (b, b_off), (e, e_off) = inner.sample_index[i], inner.sample_index[i + 1]
    b, b_off, e, e_off = int(b), int(b_off), int(e), int(e_off)
    docs = [int(d) for d in inner.document_index[b:e + 1]]
    extra = int(inner.config.add_extra_token_to_sequence)
    lengths = inner.dataset.sequence_lengths
    if b == e:
        parts = [e_off - b_off + extra]
    else:
        parts = [int(lengths[docs[0]]) - b_off] + [int(lengths[d]) for d in docs[1:-1]] + [e_off + extra]
    out, text_pos = [], 0
    for doc, n in zip(docs, parts):
        start, end = max(text_pos - 1, 0), min(text_pos + n - 1, seq)
        if end > start:
            out.append(Segment(int(sample), inner.dataset.path_prefix, doc, start, end))
        text_pos += n
    return out


def segment_losses(token_losses: np.ndarray, segments_per_row: Sequence[Sequence[Segment]]):
    """(sum of losses, sum of squared losses, token count) of every segment, rows' segments in
    order; token_losses is [rows, seq]. Cumulative sums make each segment's sums two lookups."""
    rows, seq = token_losses.shape
    flat = token_losses.astype(np.float64).ravel()
    cum = np.concatenate([[0.0], np.cumsum(flat)])
    cum2 = np.concatenate([[0.0], np.cumsum(flat * flat)])
    starts = np.array([r * seq + s.start for r, segs in enumerate(segments_per_row) for s in segs], dtype=np.int64)
    ends = np.array([r * seq + s.end for r, segs in enumerate(segments_per_row) for s in segs], dtype=np.int64)
    return cum[ends] - cum[starts], cum2[ends] - cum2[starts], ends - starts


def robust_z(means: np.ndarray, center: float, scale: float) -> np.ndarray:
    if not scale > 0:
        return np.zeros_like(means)
    return (means - center) / scale


def mad_scale(residuals: np.ndarray) -> float:
    """1.4826 x the median absolute residual: the standard deviation a normal sample would have."""
    return MAD_TO_SIGMA * float(np.median(np.abs(residuals))) if len(residuals) else 0.0


class RobustScore:
    """Robust z of one per-segment statistic (module docstring): centre = this iteration's median,
    scale = the larger of the pooled window's and this iteration's MAD; zeros until the window is full."""

    def __init__(self, window: int):
        self.residuals: deque = deque(maxlen=max(window, 1))  # per iteration: values - their median

    def __call__(self, values: np.ndarray) -> tuple[np.ndarray, float, float]:
        if not len(values):
            return np.zeros(0), float("nan"), 0.0
        center = float(np.median(values))
        self.residuals.append(values - center)
        reference = np.concatenate(list(self.residuals))
        # While the model learns fast, the spread between documents grows iteration by iteration and
        # a window of earlier ones understates it: hence this iteration's own MAD as a floor.
        own = mad_scale(values - center) if len(values) >= MIN_REFERENCE else 0.0
        scale = max(mad_scale(reference), own)
        warm = len(self.residuals) == self.residuals.maxlen and len(reference) >= MIN_REFERENCE
        return (robust_z(values, center, scale) if warm else np.zeros_like(values)), center, scale


# ------------------------------------------------------------------------------------------------
class DocumentForensics:
    """Scores the document segments of this rank's share of every training batch (module docstring).
    Enabled on last-stage ranks of tensor-parallel rank 0 with a log directory; a no-op elsewhere."""

    def __init__(self, log_dir: Optional[str], dp_rank: int, enabled: bool, zscore: float, min_tokens: int,
                 window: int):
        self.dp_rank, self.enabled = dp_rank, enabled and log_dir is not None
        self.zscore, self.min_tokens = zscore, min_tokens
        self.mean_score, self.spread_score = RobustScore(window), RobustScore(window)
        self.last: list[dict] = []  # the latest iteration's segments, for spike_documents
        self._files = {}
        self.log_dir = Path(log_dir) if log_dir else None

    @classmethod
    def from_config(cls, cfg, dp_rank: int, enabled: bool) -> DocumentForensics:
        s = cfg.spike
        return cls(cfg.logging.log_dir, dp_rank, enabled, s.suspect_zscore, s.suspect_min_tokens, s.suspect_window)

    def _write(self, name: str, rows: list[dict]) -> None:
        if name not in self._files:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._files[name] = open(self.log_dir / f"{name}-dp{self.dp_rank}.jsonl", "a", buffering=1)
        f = self._files[name]
        f.write("".join(json.dumps(r) + "\n" for r in rows))

    def observe(self, iteration: int, dataset, samples: Sequence[int], token_losses: list) -> list[dict]:
        """Score this rank's segments of `iteration` (token_losses: the micro-batches' [mbs, seq]
        tensors, rows in the order of `samples`); append suspects and the iteration's summary.
        Returns the suspects."""
        if not self.enabled or not token_losses:
            return []
        losses = torch.cat(token_losses).float().cpu().numpy()
        if losses.shape[0] != len(samples):
            # A diagnostic must not stop the run: this iteration goes unscored, and the log says so.
            # (Seen once, before the loop kept only the micro-batches' losses: see Trainer.train_step.)
            self._write("segment_losses", [{"iteration": iteration, "unscored": True,
                                            "reason": f"{losses.shape[0]} loss rows for {len(samples)} samples"}])
            return []
        per_row = [sample_segments(dataset, s) for s in samples]
        flat = [seg for segs in per_row for seg in segs]
        if not flat:
            return []
        sums, squares, counts = segment_losses(losses, per_row)
        n = np.maximum(counts, 1)
        means = sums / n
        # log of the per-token loss spread: text mixes easy and hard tokens; one token repeated,
        # or a hex dump, is uniformly (un)predictable, which its mean alone may not show
        spreads = np.log(np.sqrt(np.maximum(squares / n - means ** 2, 0.0)) + 1e-3)
        scored = counts >= self.min_tokens
        z = np.zeros_like(means)
        z_spread = np.zeros_like(means)
        z[scored], center, scale = self.mean_score(means[scored])
        z_spread[scored], _, _ = self.spread_score(spreads[scored])
        self.last = [self._row(iteration, *args) for args in zip(flat, counts, means, z, z_spread)]
        suspects = [r for r, s in zip(self.last, scored)
                    if s and max(abs(r["z"]), abs(r["z_spread"])) > self.zscore]
        if suspects:
            self._write("suspects", suspects)
        q = np.quantile(means[scored], [0.05, 0.5, 0.95]) if scored.any() else [float("nan")] * 3
        self._write("segment_losses", [{"iteration": iteration, "segments": int(scored.sum()), "p05": float(q[0]),
                                        "median": float(q[1]), "p95": float(q[2]), "scale": scale}])
        return suspects

    def _row(self, iteration: int, seg: Segment, tokens: int, mean: float, z: float, z_spread: float) -> dict:
        from megallm.data.provenance import document_source

        return {"iteration": iteration, "dp_rank": self.dp_rank, "sample": seg.sample, "document": seg.document,
                "dataset": seg.dataset, "source": document_source(seg.dataset, seg.document), "tokens": int(tokens),
                "mean_loss": round(float(mean), 5), "z": round(float(z), 3), "z_spread": round(float(z_spread), 3)}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def spike_documents(forensics: Optional[DocumentForensics], top: int = 16) -> Optional[list[dict]]:
    """On a spike iteration (every rank calls this, as every rank takes the spike decision): the
    batch's document segments from every scoring rank, highest mean loss first, on global rank 0;
    None elsewhere and when no rank scored segments."""
    import torch.distributed as dist

    mine = forensics.last if forensics is not None and forensics.enabled else []
    if not dist.is_initialized() or dist.get_world_size() == 1:
        everything = [mine]
    else:
        everything = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, everything, dst=0)
        if dist.get_rank() != 0:
            return None
    rows = sorted((r for part in everything for r in part), key=lambda r: -r["mean_loss"])
    if not rows:
        return None
    keep = ("sample", "document", "source", "tokens", "mean_loss", "z")
    return [{k: r[k] for k in keep} for r in rows[:top]]
