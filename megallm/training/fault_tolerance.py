"""Heartbeats for nvidia-resiliency-ext's `ft_launcher`, which restarts a job whose rank hangs.

Under ft_launcher every rank has a rank monitor; the loop sends a heartbeat after each iteration,
and a rank that stops sending (a stuck collective, a dead peer) is detected after the configured
timeout, the workers are restarted, and the run resumes from its last complete checkpoint (pass
--load with the same directory as --save). Without ft_launcher this module does nothing.
"""

from __future__ import annotations

import os


def under_ft_launcher() -> bool:
    # ft_launcher exports the rank monitor's IPC socket path to each worker.
    return any(k.startswith("FT_") or "RANK_MONITOR" in k for k in os.environ) and "TORCHELASTIC_RUN_ID" in os.environ


def attach(trainer) -> None:
    if not under_ft_launcher():
        return
    try:
        from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient
    except ImportError:
        return
    client = RankMonitorClient()
    client.init_workload_monitoring()
    trainer.callbacks.append(lambda tr, record: client.send_heartbeat())
