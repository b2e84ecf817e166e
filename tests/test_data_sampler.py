"""The sample stream: micro-batches tile the global batch, exclusions are stepped over, and a run
stopped at iteration k and resumed (data-parallel 2) reads what an uninterrupted run reads."""

import numpy as np
import pytest
import torch
from data_helpers import corpus, data_config, data_dir, tokenizer_model, two_datasets, write_exclude_samples  # noqa: F401

from megallm.data.dataset import SyntheticDataset, build_datasets
from megallm.data.sampler import (
    ExcludeListError,
    get_micro_batch,
    global_batch_indices,
    load_exclude_samples,
    micro_batch_indices,
    stream_to_dataset_index,
)


def test_exclusion_steps_over_excluded_indices():
    rng = np.random.default_rng(0)
    exclude = set(rng.choice(300, 80, replace=False).tolist()) | {0, 1, 2}
    kept = [i for i in range(1000) if i not in exclude]  # the definition, spelled out
    assert stream_to_dataset_index(np.arange(600), exclude).tolist() == kept[:600]
    assert stream_to_dataset_index(np.arange(5), None).tolist() == [0, 1, 2, 3, 4]
    assert global_batch_indices(10, 4, np.array(sorted(exclude))).tolist() == kept[10:14]


@pytest.mark.parametrize("dp,micro", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_micro_batches_tile_the_global_batch(dp, micro):
    gbs, consumed, exclude = 16, 48, {50, 51, 60}
    n_micro = gbs // (dp * micro)
    pieces = [micro_batch_indices(consumed, micro, r, dp, m, exclude) for m in range(n_micro) for r in range(dp)]
    assert np.concatenate(pieces).tolist() == global_batch_indices(consumed, gbs, exclude).tolist()
    # rank r, micro-batch m: stream positions consumed + (m * dp + r) * micro + [0, micro)
    assert micro_batch_indices(0, micro, dp - 1, dp, 1).tolist() == list(range((dp + dp - 1) * micro, (2 * dp) * micro))


def test_exclude_file_formats(tmp_path):
    f = tmp_path / "skip.txt"
    write_exclude_samples(f, [30, 4, 4, 17], comment="from spike at iteration 12")
    assert f.read_text() == "# from spike at iteration 12\n4\n17\n30\n"
    assert load_exclude_samples(f) == {4, 17, 30}
    f.write_text("# header\n5  # inline comment\n\n7\n")
    assert load_exclude_samples(f) == {5, 7}
    f.write_text("[3, 9]")
    assert load_exclude_samples(f) == {3, 9}
    f.write_text("5\nfive\n")
    with pytest.raises(ExcludeListError, match=r"skip.txt:2: expected a sample index"):
        load_exclude_samples(f)


def _stream(dataset, iterations, consumed, gbs, micro, dp, exclude):
    """Every (iteration, rank, micro-batch) token tensor, as the training loop reads them."""
    out = {}
    for it in iterations:
        for m in range(gbs // (micro * dp)):
            for r in range(dp):
                tokens, labels = get_micro_batch(dataset, micro_batch_indices(consumed, micro, r, dp, m, exclude))
                assert torch.equal(tokens[:, 1:], labels[:, :-1])
                out[it, r, m] = tokens
        consumed += gbs
    return out


def test_resume_reads_the_uninterrupted_stream_under_dp2(two_datasets, tokenizer_model, tmp_path):
    a, b = two_datasets
    cfg = data_config(["0.6", a, "0.4", b], tokenizer_model, tmp_path / "cache", train_iters=12,
                      global_batch_size=8, micro_batch_size=2)
    exclude = {3, 9, 40}
    write_exclude_samples(tmp_path / "skip.txt", exclude)
    cfg.data.exclude_samples = str(tmp_path / "skip.txt")  # the build adds room for the stepped-over samples
    gbs, iters, k = 8, 12, 5
    train = build_datasets(cfg)[0]
    whole = _stream(train, range(iters), 0, gbs, 2, 2, exclude)
    # stop after iteration k; a new process rebuilds the datasets (from the cache) and resumes
    first = _stream(train, range(k), 0, gbs, 2, 2, exclude)
    resumed_train = build_datasets(cfg)[0]
    second = _stream(resumed_train, range(k, iters), k * gbs, gbs, 2, 2, exclude)
    assert whole.keys() == {**first, **second}.keys()
    assert all(torch.equal(whole[key], {**first, **second}[key]) for key in whole)
    # and the global batch does not depend on how it is split over ranks
    one_rank = _stream(train, range(iters), 0, gbs, 2, 1, exclude)
    for it in range(iters):
        assert torch.equal(torch.cat([whole[it, r, m] for m in range(2) for r in range(2)]),
                           torch.cat([one_rank[it, 0, m] for m in range(4)]))


def test_synthetic_stream_is_seeded():
    ds = SyntheticDataset(100, 16, 50, seed=3)
    tokens, labels = get_micro_batch(ds, [4, 7])
    again, _ = get_micro_batch(SyntheticDataset(100, 16, 50, seed=3), [4, 7])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long and torch.equal(tokens, again)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 50 and torch.equal(tokens[:, 1:], labels[:, :-1])
    assert not torch.equal(tokens, get_micro_batch(SyntheticDataset(100, 16, 50, seed=4), [4, 7])[0])
