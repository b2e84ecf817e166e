"""Pipeline parallelism: which layers this rank holds, and one training step over micro-batches.

The schedules are torch.distributed.pipelining's; this module is the small interface the training
loop sees (its API still moves between torch releases, so nothing else imports it):

    chunks = build_model_chunks(cfg, device)          # this rank's LlamaChunks (vpp of them)
    runner = PipelineRunner(wrapped_chunks, cfg, n_microbatches, loss_fn, device)
    losses = runner.step(tokens, labels)              # per-micro-batch losses on the last stage

Chunk v of pipeline rank r is virtual stage s = v * pp + r and holds layers
[s * L / (pp * vpp), (s + 1) * L / (pp * vpp)): Megatron's interleaved assignment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from megallm.config import Config
from megallm.model.llama import LlamaChunk
from megallm.model.weight_mapping import mark_sharded_parameters
from megallm.parallel.topology import init_world_of_one


def stage_layout(cfg: Config, pp_rank: int) -> list[tuple[int, int, int]]:
    """[(virtual stage index, first layer, number of layers)] for each chunk of a pipeline rank."""
    pp = cfg.parallel.pipeline_model_parallel_size
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    per_chunk = cfg.model.num_layers // (pp * vpp)
    return [(v * pp + pp_rank, (v * pp + pp_rank) * per_chunk, per_chunk) for v in range(vpp)]


def build_model_chunks(cfg: Config, device: torch.device, pp_rank: Optional[int] = None,
                       tp_group=None) -> list[LlamaChunk]:
    from megatron.core import parallel_state

    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    num_stages = cfg.parallel.pipeline_model_parallel_size * (cfg.parallel.virtual_pipeline_model_parallel_size or 1)
    chunks = []
    for stage, first, n in stage_layout(cfg, pp_rank):
        chunk = LlamaChunk(cfg, first, n, pre_process=(stage == 0), post_process=(stage == num_stages - 1),
                           device=device, tp_group=tp_group)
        mark_sharded_parameters(chunk)
        chunks.append(chunk.to(device))
    return chunks


class StandInGroup:
    """Answers size() and rank() like a tensor-parallel group of `size` ranks, so one process can
    build (on the meta device) exactly the shards a rank of a large layout would hold."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def build_stage_on_meta(cfg: Config, pp_rank: int, tp_rank: int = 0) -> list[LlamaChunk]:
    """One pipeline rank's chunks with no memory behind them. Megatron's layers read group sizes
    only once torch.distributed is up, so a world of one is made if none exists."""
    init_world_of_one()
    group = StandInGroup(cfg.parallel.tensor_model_parallel_size, tp_rank)
    with torch.device("meta"):
        return build_model_chunks(cfg, torch.device("meta"), pp_rank=pp_rank, tp_group=group)


def _stage_class():
    """torch's PipelineStage with two changes, both what Megatron does.

    Receive buffers live from their receive being posted to the forward or backward that consumes
    them. torch.distributed.pipelining (2.13) allocates, at a stage's first step, one buffer per
    micro-batch for the stage's input and one for its output's gradient, and keeps all of them for
    the run: for the 70B recipe (512 micro-batches of [s/t, b, h] = 16 MiB) 16 GiB on every middle
    pipeline rank (128 GiB without sequence parallelism). Here the per-micro-batch receive records
    keep their shapes and lose their buffers: one is made when the receive is posted and forgotten
    once the schedule has taken it; autograd and the schedule's caches hold a received tensor for
    exactly as long as it is used (a buffer is never reused, so no receive can overwrite a tensor
    still in use).

    Weight gradients of the zero-bubble schedule's deferred weight pass land in the fp32 main
    grads micro-batch by micro-batch. torch writes them to p.grad itself (`+=`, bypassing the
    accumulation hooks), which under --bf16 would sum the micro-batches in bf16."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining._utils import _make_tensor_from_meta
    from torch.distributed.pipelining.stage import _RecvInfo

    from megallm.parallel.distributed_optimizer import fold_into_main_grad

    def unallocated(info: _RecvInfo) -> _RecvInfo:
        if info.is_root_arg or info.buffer is None:
            return info
        return _RecvInfo(info.input_name, info.source, None, info.tensor_meta)

    def allocate(infos, device) -> None:
        for info in infos:
            if not info.is_root_arg and info.buffer is None and info.tensor_meta is not None:
                info.buffer = _make_tensor_from_meta(info.tensor_meta, device)

    def forget(infos) -> None:
        for info in infos:
            if not info.is_root_arg and info.tensor_meta is not None:
                info.buffer = None

    class Stage(PipelineStage):
        def _setup_forward_recv_info(self, num_microbatches: int, has_backward: bool) -> None:
            super()._setup_forward_recv_info(1, has_backward)  # one micro-batch's records as the pattern
            pattern = self.args_recv_info[0]
            for mb in range(num_microbatches):
                self.args_recv_info[mb] = tuple(unallocated(info) for info in pattern)

        def _create_grad_recv_info(self, act_send_info: dict):
            return tuple(unallocated(info) for info in super()._create_grad_recv_info(act_send_info))

        def get_fwd_recv_ops(self, fwd_chunk_id: int):
            allocate(self.args_recv_info[fwd_chunk_id], self.device)
            return super().get_fwd_recv_ops(fwd_chunk_id)

        def get_bwd_recv_ops(self, bwd_chunk_id: int):
            if self.has_backward and not self.is_last:
                allocate(self.grad_recv_info[bwd_chunk_id], self.device)
            return super().get_bwd_recv_ops(bwd_chunk_id)

        def _retrieve_recv_activations(self, fwd_chunk_id: int):
            activations = super()._retrieve_recv_activations(fwd_chunk_id)
            forget(self.args_recv_info[fwd_chunk_id])
            return activations

        def _retrieve_recv_grads(self, bwd_chunk_id: int):
            grads = super()._retrieve_recv_grads(bwd_chunk_id)
            forget(self.grad_recv_info[bwd_chunk_id])
            return grads

        def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False):
            super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)
            for p in self.submod.parameters():
                # main_grad: once the optimizer exists. No overlap bookkeeping (the optimizer's hook
                # counts accumulations): validate() refuses overlap_grad_reduce with zero_bubble.
                if p.grad is not None and hasattr(p, "main_grad"):
                    fold_into_main_grad(p)

    return Stage


class PipelineRunner:
    """Forward and backward of one global batch's micro-batches on this rank.

    Gradients are those of the summed micro-batch losses; `microbatch_divisor` says what the
    optimizer divides them by to get the mean. Stage-to-stage tensors take the dtype of the
    activations (torch pipelining infers shapes and dtypes from the first micro-batch): bf16
    under --bf16.
    """

    def __init__(self, chunks: list[nn.Module], cfg: Config, n_microbatches: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device):
        from megatron.core import parallel_state

        self.chunks, self.n_microbatches, self.loss_fn = chunks, n_microbatches, loss_fn
        self.pp = cfg.parallel.pipeline_model_parallel_size
        self.schedule, self.stages = None, []
        if self.pp == 1:
            return
        from torch.distributed import pipelining

        group = parallel_state.get_pipeline_model_parallel_group()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        num_stages = self.pp * (cfg.parallel.virtual_pipeline_model_parallel_size or 1)
        # No static input/output shapes: they are broken in torch 2.13 (stage 0 can get zero
        # gradients); shapes are inferred from the first micro-batch instead.
        stage_class = _stage_class()
        self.stages = stages = [stage_class(chunk, stage, num_stages, device, group=group)
                                for chunk, (stage, _, _) in zip(chunks, stage_layout(cfg, pp_rank))]
        schedule = cfg.parallel.pipeline_schedule
        if cfg.parallel.virtual_pipeline_model_parallel_size:
            cls = (pipelining.ScheduleInterleavedZeroBubble if schedule == "zero_bubble"
                   else pipelining.ScheduleInterleaved1F1B)
            self.schedule = cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            cls = pipelining.ScheduleGPipe if schedule == "gpipe" else pipelining.Schedule1F1B
            self.schedule = cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
        self.first = pp_rank == 0
        self.last = pp_rank == self.pp - 1
        self.micro_batch_size, self.seq_length = cfg.training.micro_batch_size, cfg.training.seq_length
        self.device = device

    def warmup(self) -> None:
        """One discarded step on a batch of zeros. torch.distributed.pipelining's first step on a
        new schedule differs in the last bits from its later steps (measured at tp 2 x pp 2 x dp 2:
        the last stage's gradients), so without it a resumed run would not repeat an uninterrupted
        one exactly. It runs before the optimizer exists (no main-grad hooks yet), in the training
        precision; gradients are dropped and no optimizer state is touched."""
        if self.schedule is None:
            return
        zeros = torch.zeros(self.n_microbatches * self.micro_batch_size, self.seq_length, dtype=torch.long,
                            device=self.device)
        self.step(zeros, zeros)
        for chunk in self.chunks:
            for p in chunk.parameters():
                p.grad = None

    @property
    def microbatch_divisor(self) -> int:
        """What the accumulated gradients still have to be divided by: the schedules sum the
        micro-batches' gradients (scale_grads=False, because the main-grad hooks take p.grad away
        before torch could scale it); without a pipeline each micro-batch's loss is divided."""
        return 1 if self.schedule is None else self.n_microbatches

    def step(self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor]) -> Optional[list[torch.Tensor]]:
        """tokens/labels: [n_microbatches * micro_batch_size, seq]. Returns the micro-batch losses
        on ranks that hold the last stage, None elsewhere."""
        if self.schedule is None:
            return self._step_without_pipeline(tokens, labels)
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.first else ()
        self.schedule.step(*args, target=labels if self.last else None, losses=losses if self.last else None,
                           return_outputs=False)
        return [loss.detach() for loss in losses] if self.last else None

    @torch.no_grad()
    def evaluate(self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor]) -> Optional[list[torch.Tensor]]:
        """Forward only: the micro-batch losses on last-stage ranks, None elsewhere."""
        if self.schedule is None:
            (model,) = self.chunks
            return [self.loss_fn(model(x), y) for x, y in
                    zip(tokens.chunk(self.n_microbatches), labels.chunk(self.n_microbatches))]
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.first else ()
        self.schedule.eval(*args, target=labels if self.last else None, losses=losses if self.last else None)
        return [loss.detach() for loss in losses] if self.last else None

    def _step_without_pipeline(self, tokens, labels):
        (model,) = self.chunks
        losses = []
        for x, y in zip(tokens.chunk(self.n_microbatches), labels.chunk(self.n_microbatches)):
            loss = self.loss_fn(model(x), y)
            (loss / self.n_microbatches).backward()
            losses.append(loss.detach())
        return losses

