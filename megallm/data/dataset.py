# TEMPORARY STAND-IN (uncommitted) until the data branch lands.
import numpy as np
class Synthetic:
    def __init__(self, n, seq, vocab, seed): self.n, self.seq, self.vocab, self.seed = n, seq, vocab, seed
    def __len__(self): return self.n
    def __getitem__(self, i):
        t = np.random.default_rng([self.seed, i]).integers(0, self.vocab, self.seq + 1)
        return {"tokens": t[:-1], "labels": t[1:]}
def build_datasets(cfg, tokenizer=None):
    t = cfg.training
    return Synthetic(10**9, t.seq_length, cfg.model.vocab_size, t.seed), Synthetic(10**9, t.seq_length, cfg.model.vocab_size, t.seed+1), None
