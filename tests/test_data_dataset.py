"""Datasets through megatron-core's builder: blend weights, provenance of samples, sizes, a new
blend on resume, and the collective build under torch.distributed."""

import json
import os

import numpy as np
import pytest
import torch
from data_helpers import VOCAB, corpus, data_config, data_dir, tokenizer_model, two_datasets  # noqa: F401

from megallm.data.blend import DataConfigError, data_state, parse_blend
from megallm.data.dataset import SyntheticDataset, build_datasets, split_sizes
from megallm.data.provenance import describe_samples
from megallm.data.sampler import global_batch_indices
from megallm.data.tokenizer import load_tokenizer
from tests.launch import free_port


def test_parse_blend():
    assert parse_blend(["A"]) == (["A"], None)
    assert parse_blend(["A", "B"]) == (["A", "B"], None)
    assert parse_blend(["0.7", "A", "0.3", "B"]) == (["A", "B"], [0.7, 0.3])
    for bad in (["0.7", "A", "0.3"], ["A", "0.3"], ["0.7", "A", "-1", "B"], ["1", "2"]):
        with pytest.raises(DataConfigError):
            parse_blend(bad)


def test_blend_follows_weights_within_one_percent(two_datasets, tokenizer_model, tmp_path):
    a, b = two_datasets
    cfg = data_config(["0.7", a, "0.3", b], tokenizer_model, tmp_path / "cache", train_iters=625,
                      global_batch_size=16)  # 10,000 samples
    train, valid, test = build_datasets(cfg)
    assert len(train) >= 10_000 and valid is None and test is None  # no eval asked for
    described = describe_samples(train, global_batch_indices(0, 10_000))
    share_a = sum(d["dataset"] == a for d in described) / 10_000
    assert abs(share_a - 0.7) < 0.01, share_a
    # cache-hit rebuild: the same stream
    again = build_datasets(cfg)[0]
    assert np.array_equal(np.asarray(again.dataset_index), np.asarray(train.dataset_index))


def test_samples_trace_back_to_their_source_lines(two_datasets, tokenizer_model, tmp_path):
    a, b = two_datasets
    cfg = data_config([a], tokenizer_model, tmp_path / "cache", train_iters=4, global_batch_size=16)
    train = build_datasets(cfg)[0]
    tok = load_tokenizer(tokenizer_model)
    for d in describe_samples(train, [0, 7, 33]):
        assert d["dataset"] == a and len(d["documents"]) == len(d["sources"]) >= 1
        # the sample's tokens are a window of its documents' tokens, read back from the source lines
        text = []
        for source in d["sources"]:
            path, line = source.rsplit(":", 1)
            text += tok.tokenize(json.loads(open(path).readlines()[int(line) - 1])["text"]) + [tok.eod]
        sample = train[d["sample"]]["tokens"].tolist()
        assert any(text[i:i + len(sample)] == sample for i in range(len(text) - len(sample) + 1))


def test_sizes_and_item_interface(two_datasets, tokenizer_model, tmp_path):
    a, _ = two_datasets
    cfg = data_config([a], tokenizer_model, tmp_path / "cache", train_iters=20, global_batch_size=8,
                      eval_interval=5, eval_iters=2)
    assert split_sizes(cfg) == [160, (20 // 5 + 1) * 2 * 8, 2 * 8]
    cfg.data.split = "90,5,5"
    train, valid, test = build_datasets(cfg)
    assert len(train) >= 160 and len(valid) >= 80 and len(test) >= 16
    item = valid[3]
    assert item["tokens"].shape == item["labels"].shape == (64,) and item["tokens"].dtype == torch.int64
    assert int(item["tokens"].max()) < VOCAB
    # valid documents are not train documents
    train_docs = {d for s in describe_samples(train, range(len(train))) for d in s["documents"]}
    valid_docs = {d for s in describe_samples(valid, range(len(valid))) for d in s["documents"]}
    assert train_docs and valid_docs and not train_docs & valid_docs


def test_no_data_path_gives_synthetic_data():
    from megallm.config import Config

    cfg = Config()
    cfg.training.eval_interval = 10
    train, valid, test = build_datasets(cfg)
    assert isinstance(train, SyntheticDataset)
    assert len(train) == cfg.training.train_iters * cfg.training.global_batch_size
    assert train.seed != valid.seed
    assert describe_samples(train, [3]) == [{"sample": 3, "dataset": "synthetic", "documents": [], "sources": []}]


def test_new_blend_on_resume_replays_nothing(two_datasets, tokenizer_model, tmp_path):
    a, b = two_datasets
    cache, gbs = tmp_path / "cache", 16
    (tmp_path / "skip.txt").write_text("5\n")
    only_a = data_config([a], tokenizer_model, cache, train_iters=40, global_batch_size=gbs)
    only_a.data.exclude_samples = str(tmp_path / "skip.txt")
    train_a = build_datasets(only_a)[0]
    consumed = 10 * gbs
    state = data_state(train_a, only_a.data.data_path, consumed, exclude={5})
    assert state["consumed_per_dataset"] == {os.path.realpath(a): consumed + 1}  # the excluded one counts
    both = data_config(["0.5", a, "0.5", b], tokenizer_model, cache, train_iters=40, global_batch_size=gbs)
    both.data.exclude_samples = only_a.data.exclude_samples
    train_ab = build_datasets(both, resume_state=state)[0]
    start = consumed + 1
    assert state["next_sample"] == start
    assert global_batch_indices(consumed, 1, {5})[0] == start  # where the resumed stream reads
    with pytest.raises(IndexError, match="the blend changed"):
        train_ab[start - 1]
    after = [train_ab.locate(i) for i in range(start, start + 200)]
    a_samples = [j for ds, j in after if ds.dataset_path == a]
    b_samples = [j for ds, j in after if ds.dataset_path == b]
    # A continues right after what it gave (no replay), B starts at its beginning, weights hold
    assert a_samples == list(range(consumed + 1, consumed + 1 + len(a_samples)))
    assert b_samples == list(range(len(b_samples)))
    assert abs(len(a_samples) - 100) <= 1
    # and A's continuation is A's own stream: the samples an A-only run would have read next
    for i, (ds, j) in zip(range(start, start + 20), after):
        if ds.dataset_path == a:
            assert torch.equal(train_ab[i]["tokens"], train_a[j]["tokens"])
    later = data_state(train_ab, both.data.data_path, consumed + 4 * gbs, exclude={5})
    assert later["consumed_per_dataset"] == {os.path.realpath(a): consumed + 1 + 32, os.path.realpath(b): 32}



def _build_on_rank(rank, world, port, cfg, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train = build_datasets(cfg)[0]
        queue.put((rank, np.asarray(train.dataset_index[:64]).tolist(), train[5]["tokens"].tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_collective_build_on_two_ranks(two_datasets, tokenizer_model, tmp_path):
    """Every rank calls build_datasets: rank 0 builds the caches, rank 1 waits and reads them."""
    import torch.multiprocessing as mp

    a, b = two_datasets
    cfg = data_config(["0.5", a, "0.5", b], tokenizer_model, tmp_path / "cache", train_iters=10,
                      global_batch_size=8)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_build_on_rank, args=(r, 2, port, cfg, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (idx, tok)) for r, idx, tok in (queue.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert any(name.endswith("BlendedDataset-train-dataset_index.npy") for name in os.listdir(tmp_path / "cache"))
