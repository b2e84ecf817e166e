"""Checks of the mixed-precision optimizer that need a live Trainer (used by train_worker.py).

- perturb(tr, scale): adds scale * N(0, 1) to every weight (seeded), for the noise floor of a
  loss comparison: how far two fp32 runs drift apart from a difference of that size.
- watch_one_step(tr, iteration): at that iteration, snapshots what the optimizer steps from (fp32
  masters, fp32 main grads after clipping, Adam's moments and hyper-parameters), lets the step
  run, and compares the new masters with an independent torch AdamW (foreach=False) applied to
  the same fp32 inputs; then checks that every (bf16) weight equals its fp32 master rounded, on
  every element, which also checks the all-gather.
"""

import torch
import torch.distributed as dist


def perturb(tr, scale: float) -> None:
    g = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for p in tr.params:
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    tr.optimizer.reload_masters_from_params()


def watch_one_step(tr, iteration: int) -> dict:
    """Returns a dict that the step fills in: {"masters_bitwise": bool, "weights_are_rounded_masters": bool}."""
    opt, inner = tr.optimizer, tr.optimizer.optimizer
    original_step = inner.step
    result = {}

    def step(*args, **kwargs):
        if tr.iteration + 1 != iteration:
            return original_step(*args, **kwargs)
        masters, reference = [], []
        for group in inner.param_groups:
            for master in group["params"]:
                state = inner.state[master]
                ref = master.detach().clone()
                ref.grad = master.grad.detach().clone()
                masters.append(master)
                reference.append((ref, group, {k: v.clone() for k, v in state.items()}))
        out = original_step(*args, **kwargs)
        equal = True
        for master, (ref, group, state) in zip(masters, reference):
            adam = torch.optim.AdamW([ref], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                     weight_decay=group["weight_decay"], foreach=False)
            if state:
                adam.state[ref] = state
            adam.step()
            equal = equal and torch.equal(ref, master)
        result["masters_bitwise"] = equal
        result["masters_checked"] = len(masters)
        return out

    inner.step = step

    def after(trainer, record):
        if trainer.iteration != iteration:
            return
        # every element of every weight is its master rounded to the weights' dtype: the masters
        # of the other data-parallel ranks arrive through the all-gather
        full = {}
        for p in opt.params:
            full[id(p)] = torch.zeros(p.numel(), dtype=torch.float32)
        for x in opt.pieces:
            full[id(x.param)][x.start:x.end] = x.master.detach().reshape(-1)
        if not opt.distributed and opt.dp_rank != 0:
            for t in full.values():
                t.zero_()
        ok = True
        for p in opt.params:
            dist.all_reduce(full[id(p)], group=opt.group)
            ok = ok and torch.equal(full[id(p)].to(p.dtype).view_as(p), p.detach())
        result["weights_are_rounded_masters"] = ok
        result["weights_dtype"] = str(opt.params[0].dtype)

    tr.callbacks.append(after)
    return result


def watch_unchanged(tr, iteration: int) -> dict:
    """Whether the weights, fp32 masters and Adam moments after `iteration` equal, bit for bit,
    those before it (what a skipped iteration must leave)."""
    result = {}

    def state():
        opt = tr.optimizer
        return [t.detach().clone() for t in [*tr.params, *opt.master_tensors(), *opt.state_tensors()]]

    def after(trainer, record):
        if trainer.iteration == iteration - 1:
            result["before"] = state()
        elif trainer.iteration == iteration:
            before = result.pop("before")
            now = state()
            result["unchanged"] = len(before) == len(now) and all(torch.equal(a, b) for a, b in zip(before, now))
            result["tensors"] = len(now)

    tr.callbacks.append(after)
    return result
