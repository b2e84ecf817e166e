# TEMPORARY STAND-IN (uncommitted) until the data branch lands.
import numpy as np, torch
def load_exclude_samples(path):
    return {int(l) for l in open(path) if l.strip() and not l.startswith('#')}
def global_batch_indices(consumed_samples, global_batch_size, exclude=None):
    return np.arange(consumed_samples, consumed_samples + global_batch_size)
def micro_batch_indices(consumed_samples, micro_batch_size, dp_rank, dp_size, micro_batch_index, exclude=None):
    start = consumed_samples + micro_batch_index * micro_batch_size * dp_size + dp_rank * micro_batch_size
    return np.arange(start, start + micro_batch_size)
def get_micro_batch(dataset, indices):
    items = [dataset[int(i)] for i in indices]
    return (torch.stack([torch.as_tensor(np.asarray(it["tokens"]), dtype=torch.long) for it in items]),
            torch.stack([torch.as_tensor(np.asarray(it["labels"]), dtype=torch.long) for it in items]))
