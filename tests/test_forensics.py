"""Per-document losses (megallm/training/forensics.py): segments of a hand-built dataset against
its known documents, robust z, suspects written and read back by the report."""

import json

import numpy as np
import pytest
import torch

from megallm.config import Config
from megallm.data.dataset import build_datasets
from megallm.data.provenance import Provenance, sidecar_path
from megallm.training import forensics
from megallm.training.forensics import DocumentForensics, mad_scale, robust_z, sample_segments, segment_losses

SEQ = 32
LENGTHS = [5, 70, 3, 40, 1, 33, 120, 9, 64, 17, 2, 50]  # shorter and longer than a sample


def token(doc: int, k: int) -> int:
    return doc * 1000 + k  # every token names its document and position


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = tmp_path_factory.mktemp("hand")
    prefix = str(tmp / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d, n in enumerate(LENGTHS):
        builder.add_document(np.array([token(d, k) for k in range(n)], dtype=np.int32), [n])
    builder.finalize(prefix + ".idx")
    Provenance(["hand.jsonl"], np.zeros(len(LENGTHS), np.int32), np.arange(1, len(LENGTHS) + 1) * 10).save(
        sidecar_path(prefix))
    cfg = Config()
    cfg.data.data_path, cfg.data.data_cache_path = [prefix], str(tmp / "cache")
    cfg.data.split = "100,0,0"
    cfg.model.vocab_size = 1000 * len(LENGTHS)
    cfg.training.seq_length, cfg.training.train_iters, cfg.training.global_batch_size = SEQ, 4, 8
    cfg.training.eval_interval = 0
    return prefix, build_datasets(cfg)[0]


def test_segments_cover_exactly_their_documents_labels(hand_built):
    prefix, ds = hand_built
    seen_docs = set()
    for sample in range(len(ds)):
        labels = ds[sample]["labels"].tolist()
        segments = sample_segments(ds, sample)
        assert segments and segments[0].start == 0
        for a, b in zip(segments, segments[1:]):
            assert a.end == b.start  # contiguous, in order
        for seg in segments:
            assert seg.dataset == prefix and seg.sample == sample
            got = labels[seg.start:seg.end]
            first = got[0] % 1000
            # the labels of a segment are consecutive tokens of its own document, nothing else
            assert got == [token(seg.document, k) for k in range(first, first + len(got))], (sample, seg)
            seen_docs.add(seg.document)
        # the last document runs to the end of the sample (no padding in a full epoch)
        assert segments[-1].end == SEQ
    assert seen_docs == set(range(len(LENGTHS)))


def test_segment_losses_are_sums_and_counts():
    rng = np.random.default_rng(0)
    losses = rng.random((2, 10))
    seg = forensics.Segment
    rows = [[seg(0, "p", 0, 0, 4), seg(0, "p", 1, 4, 10)], [seg(1, "p", 2, 0, 10)]]
    sums, squares, counts = segment_losses(losses, rows)
    np.testing.assert_allclose(sums, [losses[0, :4].sum(), losses[0, 4:].sum(), losses[1].sum()])
    np.testing.assert_allclose(squares, [(losses[0, :4] ** 2).sum(), (losses[0, 4:] ** 2).sum(), (losses[1] ** 2).sum()])
    assert counts.tolist() == [4, 6, 10]


def test_robust_z_ignores_the_outlier_it_scores():
    means = np.array([3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 9.0])
    center = float(np.median(means))
    scale = mad_scale(means - center)
    assert scale == pytest.approx(1.4826 * 0.05)
    z = robust_z(means, center, scale)
    assert z[-1] == pytest.approx(6.0 / (1.4826 * 0.05))  # the junk one, ~81 robust sigmas
    assert np.all(np.abs(z[:-1]) <= 1.5)
    assert np.all(robust_z(means, center, 0.0) == 0)  # no spread: no verdict


def test_suspects_written_and_read_back(hand_built, tmp_path):
    from megallm.report.suspects import read_suspects, suspect_documents

    prefix, ds = hand_built
    samples = list(range(8))
    per_row = [sample_segments(ds, s) for s in samples]
    rng = np.random.default_rng(1)
    losses = 4.0 + 0.1 * rng.standard_normal((8, SEQ))
    junk = next(seg for segs in per_row for seg in segs if seg.end - seg.start >= 8)
    losses[samples.index(junk.sample), junk.start:junk.end] = 9.0  # one document the model cannot predict
    fx = DocumentForensics(str(tmp_path), dp_rank=1, enabled=True, zscore=6.0, min_tokens=8, window=1)
    with forensics.keep_token_losses() as kept:
        for m in range(4):  # as loss_fn would see 4 micro-batches of 2
            forensics.keep(torch.from_numpy(losses[2 * m:2 * m + 2]))
    assert forensics._kept is None and len(kept) == 4
    suspects = fx.observe(7, ds, samples, kept)
    fx.close()
    assert [(s["sample"], s["document"]) for s in suspects] == [(junk.sample, junk.document)]
    assert suspects[0]["source"] == f"hand.jsonl:{(junk.document + 1) * 10}" and suspects[0]["z"] > 6
    lines = [json.loads(l) for l in (tmp_path / "suspects-dp1.jsonl").read_text().splitlines()]
    assert lines == suspects and lines[0]["iteration"] == 7 and lines[0]["tokens"] == junk.end - junk.start
    summary = json.loads((tmp_path / "segment_losses-dp1.jsonl").read_text())
    assert summary["iteration"] == 7 and 3.9 < summary["median"] < 4.1
    assert read_suspects(tmp_path) == suspects
    docs = suspect_documents(read_suspects(tmp_path))
    assert docs[0]["source"] == suspects[0]["source"] and docs[0]["occurrences"] == 1


def test_disabled_rank_writes_nothing(hand_built, tmp_path):
    _, ds = hand_built
    fx = DocumentForensics(str(tmp_path), dp_rank=0, enabled=False, zscore=6.0, min_tokens=8, window=4)
    assert fx.observe(1, ds, [0], [torch.zeros(1, SEQ)]) == []
    assert not list(tmp_path.iterdir())
