"""Heartbeats for nvidia-resiliency-ext's `ft_launcher`, which restarts a job whose rank hangs.

Under ft_launcher every rank has a rank monitor; the loop sends a heartbeat after each iteration,
and a rank that stops sending (a stuck collective, a dead peer) is detected after the configured
timeout, the workers are restarted, and the run resumes from its last complete checkpoint (pass
--load with the same directory as --save). Without ft_launcher this module does nothing.
"""

from __future__ import annotations

import os


def under_ft_launcher() -> bool:
    # ft_launcher hands each worker its rank monitor's IPC socket in this variable.
    return "FT_RANK_MONITOR_IPC_SOCKET" in os.environ


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
