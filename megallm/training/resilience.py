"""What the training loop does when the run is in trouble: stop on request, roll back past spikes.

- Signals (a scheduler's preemption): SIGTERM/SIGINT set `stop_requested`; the ranks vote on it
  at every iteration boundary (any rank's signal stops all), the loop checkpoints and exits 0.
- Rollback (PaLM's recipe): reload the newest checkpoint from before the first of the recent
  spikes and move the data past the bad window.
"""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed as dist

from megallm import checkpoint
from megallm.parallel.data_parallel import any_rank


class StopTraining(Exception):
    """The run cannot go on (spike_action=stop, or rollbacks exhausted); the message says why."""


def install_signal_handlers(tr) -> None:
    """SIGTERM/SIGINT: checkpoint at the next iteration boundary and exit 0; a second signal exits at once."""

    def handler(signum, frame):
        if tr.stop_requested:
            print(f" second signal {signum}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        tr.stop_requested = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def stop_vote(tr) -> bool:
    """Collective: whether any rank was asked to stop (every rank must leave at the same iteration)."""
    tr.stop_requested = any_rank(tr.stop_requested, tr.device)
    return tr.stop_requested


def rollback(tr) -> None:
    spikes = tr.policy.recent_spikes(tr.iteration)
    rollbacks = list(tr.policy.rollbacks)
    if tr.policy.exhausted:
        raise StopTraining(
            f"loss spikes persist after {len(rollbacks)} rollbacks (spike_max_rollbacks): spikes at iterations "
            f"{spikes}, samples up to {tr.consumed_samples}; see spikes.jsonl and run tools/spike_report.py")
    consumed_after = tr.consumed_samples + tr.cfg.spike.spike_rollback_skip_samples
    iteration_before = tr.iteration
    to = checkpoint.load(tr, tr.cfg.checkpoint.save, before_iteration=min(spikes))
    tr.policy.rollbacks = rollbacks  # the checkpoint predates them; the count must survive
    consumed_before = tr.consumed_samples
    tr.consumed_samples = consumed_after
    tr.policy.record_rollback(iteration_before, to, spikes)
    tr.logger.event("rollback", iteration_before, to_iteration=to,
                    checkpoint=str(checkpoint.iter_dir(tr.cfg.checkpoint.save, to)), spike_iterations=spikes,
                    consumed_samples_before=consumed_before, consumed_samples_after=consumed_after)
    if dist.get_rank() == 0:
        print(f" rollback: spikes at {spikes}; reloaded iteration {to}, data moved to sample {consumed_after}",
              flush=True)
