"""Sharded checkpoints: every rank writes its own pieces; any layout loads them.

One 8-rank torchrun (tp 2 x pp 2 x dp 2, ZeRO-1, --async-save) trains 6 iterations saving at 3 and
6, and also writes a v1 checkpoint at 3 with the old writer; the same launch resumes from
iteration 3 at tp2 pp2 dp2 (bitwise), tp1 pp4 dp2, tp4 pp1 dp2, and from the v1 checkpoint. One
4-rank torchrun resumes at tp2 pp2 dp1 from the run directory after one byte of rank 3's
optimizer shard of iteration 6 was flipped: it names the file and its writer, and falls back to 3.
The model has 4 key/value groups (tiny.yaml has 2) so that tp 4 divides them.
"""

import json
import math

import pytest
import torch

from megallm.checkpoint.regions import part_rects, piece_view, range_pieces
from megallm.config import Config, apply_overrides, load_yaml
from megallm.model import weight_mapping as wm
from tests.launch import ROOT, torchrun

MODEL = {"num_query_groups": 4, "lr_warmup_iters": 2, "eval_interval": 0, "use_distributed_optimizer": True}


def spec(tmp, name, scenarios):
    path = tmp / f"spec_{name}.json"
    path.write_text(json.dumps({"config": str(ROOT / "configs/tiny.yaml"), "out": str(tmp), "defaults": MODEL,
                                "scenarios": scenarios}))
    return str(path)


def result(tmp, name):
    return json.loads((tmp / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    z, old = str(tmp / "ckpt_z"), str(tmp / "ckpt_v1")
    at3 = z + "/iter_0000003"

    def sc(name, tp, pp, iters, **extra):
        return {"name": name, "overrides": {"tp": tp, "pp": pp, "train_iters": iters, "log_dir": str(tmp / name),
                                            **extra.pop("overrides", {})}, **extra}

    scenarios = [
        sc("straight", 2, 2, 6, overrides={"save": z, "save_interval": 3, "async_save": True}, save_v1=[old, 3]),
        sc("resumed", 2, 2, 6, load=at3),
        sc("tp1_pp4", 1, 4, 5, load=at3),
        sc("tp4_pp1", 4, 1, 5, load=at3),
        sc("from_v1", 2, 2, 6, load=old + "/iter_0000003"),
    ]
    torchrun(8, "tests/distributed/checkpoint_worker.py", spec(tmp, "8", scenarios), timeout=1200)
    # one flipped byte in the tensor data of rank 3's optimizer shard of the newest checkpoint
    damaged = tmp / "ckpt_z" / "iter_0000006" / "optim" / "rank_00003.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-50] ^= 0xFF
    damaged.write_bytes(bytes(data))
    proc = torchrun(4, "tests/distributed/checkpoint_worker.py",
                    spec(tmp, "4", [sc("tp2_pp2_dp1", 2, 2, 5, load=z)]), timeout=900)
    return tmp, proc.stdout, damaged


def losses(run, start=1):
    return {r["iteration"]: r["loss"] for r in run["records"] if r["iteration"] >= start}


@pytest.mark.slow
def test_resume_with_zero1_and_async_save_is_bitwise(runs):
    tmp, _, _ = runs
    straight, resumed = result(tmp, "straight"), result(tmp, "resumed")
    assert resumed["loaded_iteration"] == 3
    assert losses(resumed) == losses(straight, 4)  # == on floats: bitwise
    assert [r["grad_norm"] for r in resumed["records"]] == [r["grad_norm"] for r in straight["records"][3:]]
    assert (tmp / "ckpt_z" / "latest_checkpointed_iteration.txt").read_text() == "6"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp1_pp4", "tp4_pp1", "tp2_pp2_dp1"])
def test_resume_at_another_layout_continues_the_same_run(runs, name):
    tmp, _, _ = runs
    run, straight = result(tmp, name), losses(result(tmp, "straight"))
    assert run["loaded_iteration"] == 3, run.get("error")
    # another layout sums in another order: equal within fp32 rounding, not bitwise
    for it, loss in losses(run).items():
        assert loss == pytest.approx(straight[it], rel=1e-6), (name, it)


@pytest.mark.slow
def test_v1_checkpoint_loads_with_its_optimizer_state(runs):
    tmp, _, _ = runs
    meta = json.loads((tmp / "ckpt_v1" / "iter_0000003" / "meta.json").read_text())
    assert meta["format"] == "megallm-checkpoint-v1"
    assert losses(result(tmp, "from_v1")) == losses(result(tmp, "straight"), 4)


@pytest.mark.slow
def test_meta_lists_the_files_of_every_rank_and_pieces_cover_every_tensor(runs):
    tmp, _, _ = runs
    meta = json.loads((tmp / "ckpt_z" / "iter_0000003" / "meta.json").read_text())
    assert meta["format"] == "megallm-checkpoint-v2"
    assert meta["layout"] | {"vpp": None} == {"tp": 2, "pp": 2, "vpp": None, "dp": 2, "world_size": 8,
                                              "use_distributed_optimizer": True}
    for kind in ("model", "optim", "rng"):
        writers = {rec["writer_rank"] for name, rec in meta["files"].items() if name.startswith(kind + "/")}
        assert writers == set(range(8)), kind
    for name, rec in meta["files"].items():
        path = tmp / "ckpt_z" / "iter_0000003" / name
        assert path.stat().st_size == rec["bytes"] and name.endswith(f"rank_{rec['writer_rank']:05d}" + path.suffix)
    stored = {}
    for p in meta["pieces"]:
        stored[p["t"]] = stored.get(p["t"], 0) + math.prod(p["shape"])
        assert p["optim"] == p["file"].replace("model/", "optim/")
    assert stored == {name: math.prod(shape) for name, shape in meta["tensors"].items()}  # once each, no overlap
    assert meta["trainer"]["iteration"] == 3 and meta["trainer"]["consumed_samples"] == 48
    assert not (tmp / "ckpt_z" / "iter_0000003" / "done").exists()


@pytest.mark.slow
def test_a_flipped_byte_is_named_with_its_writer_and_the_previous_checkpoint_is_used(runs):
    tmp, out, damaged = runs
    assert f"{damaged}: checksum mismatch (corrupted; written by rank 3)" in out
    assert f"fell back to {tmp / 'ckpt_z' / 'iter_0000003'}" in out


@pytest.mark.parametrize("tp, start, end", [(2, 0, 10**9), (2, 1000, 5000), (4, 333, 70001), (1, 7, 8)])
def test_flat_ranges_map_to_logical_boxes_and_back(tp, start, end):
    """Any flat range of a fused local shard, cut into logical boxes, lands where to_logical puts it."""
    cfg = apply_overrides(load_yaml(ROOT / "configs/tiny.yaml"), {"num_query_groups": 4, "tp": tp})
    parts = wm.LAYER_PARTS["self_attention.linear_qkv.weight"]
    parts = [wm.Part(wm.layer_prefix(0) + p.logical, p.dim) for p in parts]
    shapes = wm.logical_shapes(cfg, 0)
    logical = {p.logical: torch.randn(shapes[p.logical]) for p in parts}
    rebuilt = {k: torch.full_like(v, float("nan")) for k, v in logical.items()}
    for r in range(tp):
        local = wm.shard([logical[p.logical] for p in parts], [p.dim for p in parts], r, tp)
        lo, hi = min(start, local.numel()), min(end, local.numel())
        flat = local.view(-1)[lo:hi]
        for piece in range_pieces(local, part_rects(local, parts, cfg, r), lo, hi):
            box = tuple(slice(s, s + n) for s, n in zip(piece.logical_start, piece.shape))
            assert torch.isnan(rebuilt[piece.name][box]).all()  # no element written twice
            rebuilt[piece.name][box] = piece_view(flat, piece)
    for name, t in logical.items():
        if start == 0 and end >= 10**9:
            assert torch.equal(rebuilt[name], t), name
        else:
            mask = ~torch.isnan(rebuilt[name])
            assert torch.equal(rebuilt[name][mask], t[mask]) and mask.any() or not mask.any()


def test_padded_vocabulary_rows_are_not_stored():
    cfg = Config()
    cfg.model.vocab_size, cfg.parallel.tensor_model_parallel_size = 4095, 2  # padded to 4096
    parts = wm.OTHER_PARTS["output_layer.weight"]
    local = torch.zeros(cfg.padded_vocab_size // 2, cfg.model.hidden_size)
    rects = part_rects(local, parts, cfg, 1)
    assert rects[0].logical_start == (2048, 0) and rects[0].shape == (2047, cfg.model.hidden_size)
    pieces = range_pieces(local, rects, 0, local.numel())
    assert sum(math.prod(p.shape) for p in pieces) == 2047 * cfg.model.hidden_size


class ContractOptimizer:
    """Speaks the sharded-state contract the way megallm's distributed optimizer does (contiguous
    ranges of every parameter, fp32 masters beside the model's weights), with `n_ranges` ranges
    per parameter that cut rows and q/k/v boundaries anywhere."""

    def __init__(self, params, n_ranges: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.params, self.n = params, n_ranges
        self.state = {id(p): {"exp_avg": torch.randn(p.numel(), generator=g),
                              "exp_avg_sq": torch.rand(p.numel(), generator=g),
                              "main_param": p.detach().reshape(-1) + 1e-3 * torch.randn(p.numel(), generator=g)}
                      for p in params}
        self.scalars = {"step": 7}

    def ranges(self, p):
        return [(p.numel() * i // self.n, p.numel() * (i + 1) // self.n) for i in range(self.n)]

    def sharded_state(self):
        from megallm.training.optimizer_state import OptimizerShard

        return [OptimizerShard(p, s, e, {k: v[s:e] for k, v in self.state[id(p)].items()})
                for p in self.params for s, e in self.ranges(p)], dict(self.scalars)

    def finish_param_sync(self):
        pass  # no weight all-gather of its own in flight

    def reload_masters_from_params(self):
        for p in self.params:
            self.state[id(p)]["main_param"].copy_(p.detach().reshape(-1))

    def load_sharded_state(self, read, scalars):
        self.scalars = dict(scalars)
        for p in self.params:
            for s, e in self.ranges(p):
                for k, v in self.state[id(p)].items():
                    v[s:e] = read(p, s, e, k)


class StandInTrainer:
    def __init__(self, cfg, chunks, optimizer):
        from megallm.training.metrics import MetricsLogger

        self.cfg, self.chunks, self.optimizer, self.device = cfg, chunks, optimizer, torch.device("cpu")
        self.iteration, self.consumed_samples, self.loaded = 4, 64, None
        self.logger = MetricsLogger("unused", enabled=False)

    def state_dict(self):
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples, "scheduler": {}}

    def load_state_dict(self, state):
        self.loaded = state


def test_contract_optimizer_with_masters_round_trips_through_other_ranges(single_rank, tmp_path):
    from megallm import checkpoint
    from megallm.model.llama import LlamaChunk

    cfg = apply_overrides(load_yaml(ROOT / "configs/tiny.yaml"), {"num_layers": 2, "save": str(tmp_path)})

    def trainer(n_ranges, seed):
        chunk = LlamaChunk(cfg, 0, 2, pre_process=True, post_process=True)
        wm.init_weights(chunk, cfg, 0)
        return StandInTrainer(cfg, [chunk], ContractOptimizer(list(chunk.parameters()), n_ranges, seed))

    saved = trainer(3, seed=1)
    for p in saved.chunks[0].parameters():  # weights distinct from the initial ones
        p.data.add_(0.5)
    checkpoint.save(saved, async_save=True)
    checkpoint.wait_for_pending()
    meta = checkpoint.read_meta(tmp_path / "iter_0000004")
    assert meta["optimizer"] == {"scalars": {"step": 7}, "keys": ["exp_avg", "exp_avg_sq", "main_param"]}
    loaded = trainer(2, seed=2)  # other ranges, other values
    assert checkpoint.load(loaded, tmp_path) == 4 and loaded.loaded["consumed_samples"] == 64
    assert loaded.optimizer.scalars == {"step": 7}
    for a, b in zip(saved.chunks[0].parameters(), loaded.chunks[0].parameters()):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "main_param"):
            assert torch.equal(saved.optimizer.state[id(a)][key], loaded.optimizer.state[id(b)][key]), key


def test_a_failed_background_write_is_reported_and_latest_stays(single_rank, tmp_path, monkeypatch):
    import importlib

    from megallm import checkpoint
    from megallm.model.llama import LlamaChunk

    save_mod = importlib.import_module("megallm.checkpoint.save")  # the package's `save` is the function

    cfg = apply_overrides(load_yaml(ROOT / "configs/tiny.yaml"), {"num_layers": 2, "save": str(tmp_path)})
    chunk = LlamaChunk(cfg, 0, 2, pre_process=True, post_process=True)
    tr = StandInTrainer(cfg, [chunk], ContractOptimizer(list(chunk.parameters()), 2, seed=0))
    checkpoint.save(tr, async_save=True)
    assert checkpoint.wait_for_pending() is None

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save_mod, "save_file", disk_full)
    tr.iteration = 8
    checkpoint.save(tr, async_save=True)
    error = checkpoint.wait_for_pending()
    assert "No space left on device" in error
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not (tmp_path / "iter_0000008").exists()
    assert (tmp_path / "iter_0000008.partial" / "done" / "rank_00000.failed").exists()
