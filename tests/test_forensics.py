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
    np.testing.assert_allclose(squares, [(losses[0, :4] ** 2).sum(), (losses[0, 4:] ** 2).sum(),
                                         (losses[1] ** 2).sum()])
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
    lines = [json.loads(line) for line in (tmp_path / "suspects-dp1.jsonl").read_text().splitlines()]
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


def test_skip_list_from_suspects_and_both(tmp_path):
    from megallm.data.sampler import load_exclude_samples
    from megallm.report.suspects import suspect_documents, write_skip_list

    rows = [{"iteration": 9, "sample": 40, "document": 3, "dataset": "d", "source": "a.jsonl:7", "tokens": 64,
             "mean_loss": 9.1, "z": 8.0, "z_spread": 1.0},
            {"iteration": 30, "sample": 77, "document": 3, "dataset": "d", "source": "a.jsonl:7", "tokens": 64,
             "mean_loss": 9.0, "z": 7.0, "z_spread": -0.5},
            {"iteration": 12, "sample": 50, "document": 5, "dataset": "d", "source": "a.jsonl:9", "tokens": 90,
             "mean_loss": 1.0, "z": -2.0, "z_spread": -9.5}]
    docs = suspect_documents(rows)
    assert [(d["source"], d["occurrences"], d["max_abs_z"], d["direction"]) for d in docs] == [
        ("a.jsonl:7", 2, 8.0, "high"), ("a.jsonl:9", 1, 9.5, "uniform")]  # evidence 15 before 9.5
    spike = {"iteration": 20, "action": "skip", "reason": "loss_zscore", "loss": 9.0, "samples": [50, 51],
             "samples_derived": False, "sources": [], "documents": None}
    report = {"log_dir": "run", "spikes": [spike], "suspect_documents": docs, "suspects": {"suspect_zscore": 6.0}}
    got = write_skip_list(report, tmp_path / "s.txt", "suspects")
    assert load_exclude_samples(tmp_path / "s.txt") == {40, 77, 50} and got["suspect_documents"] == 2
    got = write_skip_list(report, tmp_path / "b.txt", "both")
    assert load_exclude_samples(tmp_path / "b.txt") == {50, 51, 40, 77} and got["samples"] == 4
    assert write_skip_list(report, tmp_path / "p.txt", "spikes") == {"path": str(tmp_path / "p.txt"), "samples": 2,
                                                                     "batches": 1}
    with pytest.raises(ValueError, match="--skip-list-from"):
        write_skip_list(report, tmp_path / "x.txt", "everything")


def test_train_step_scores_its_own_rows(hand_built, tmp_path, single_rank):
    """In the loop (one process): the kept per-token losses are the loss's own (their segments'
    sums over a row's tokens give back the batch loss), and the files land in the log dir."""
    from megallm.training.loop import Trainer

    prefix, ds = hand_built
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size = 2, 64, 128
    cfg.model.num_attention_heads, cfg.model.num_query_groups = 4, 2
    cfg.model.vocab_size, cfg.model.max_position_embeddings = 1000 * len(LENGTHS), SEQ
    cfg.training.seq_length, cfg.training.global_batch_size, cfg.training.micro_batch_size = SEQ, 4, 2
    cfg.training.train_iters = 2
    cfg.logging.log_dir, cfg.logging.tensorboard = str(tmp_path), False
    cfg.spike.suspect_window, cfg.spike.suspect_min_tokens = 1, 1
    tr = Trainer.build(cfg, 1, datasets=(ds, None, None))
    assert tr.doc_losses.enabled
    record = tr.train_step()
    segs = tr.doc_losses.last
    assert sorted({s["sample"] for s in segs}) == [0, 1, 2, 3] and sum(s["tokens"] for s in segs) == 4 * SEQ
    total = sum(s["mean_loss"] * s["tokens"] for s in segs) / (4 * SEQ)
    assert total == pytest.approx(record["loss"], rel=1e-4)
    assert record["forensics_ms"] >= 0
    tr.doc_losses.close()
    summary = json.loads((tmp_path / "segment_losses-dp0.jsonl").read_text())
    assert summary["iteration"] == 1 and summary["segments"] == len(segs)
