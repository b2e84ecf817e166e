"""Node registration with a deadline, before any process group exists.

torch.distributed's own rendezvous waits for every node until its timeout and then fails without
saying which node is missing. Here node 0's first process hosts a TCPStore; every node posts its
facts under node/<k>; at the deadline node 0 publishes the roster of the nodes that came. The
nodes present then build the process group among themselves (ranks renumbered over the roster),
so one missing node costs the timeout, names itself, and the other nodes are still checked.

Also here: a tiny TCP listener per node, which its neighbours connect to before the process group
is built, so an unreachable node is named instead of hanging gloo/NCCL's full-mesh connect.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

POLL_S = 0.1


class MasterUnreachable(RuntimeError):
    pass


def connect(addr: str, port: int, host: bool, timeout_s: float) -> dist.TCPStore:
    """The registration store: served by node 0's local rank 0, a client everywhere else (the
    client retries until timeout_s, so nodes may start in any order)."""
    try:
        return dist.TCPStore(addr, port, None, host, timedelta(seconds=timeout_s), wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError/DistStoreError derive from RuntimeError
        where = "serve" if host else "reach"
        raise MasterUnreachable(f"could not {where} the preflight store at {addr}:{port} within "
                                f"{timeout_s:.0f} s ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                ) from None


def post(store: dist.Store, key: str, value) -> None:
    store.set(key, json.dumps(value))


def wait_for(store: dist.Store, key: str, timeout_s: float):
    """The JSON value under key, waiting up to timeout_s; TimeoutError naming the key otherwise."""
    try:
        store.wait([key], timedelta(seconds=max(timeout_s, 0.01)))
    except RuntimeError:
        raise TimeoutError(f"no '{key}' in the preflight store after {timeout_s:.0f} s") from None
    return json.loads(store.get(key))


def wait_for_all(store: dist.Store, keys: list[str], deadline: float, started: Optional[float] = None) -> dict:
    """key -> (value, seconds since `started` it was first seen) for the keys that appear before the
    monotonic deadline. Polled: never raises, never waits past the deadline."""
    started = time.monotonic() if started is None else started
    found = {}
    while True:
        for key in keys:
            if key not in found and store.check([key]):
                found[key] = (json.loads(store.get(key)), round(time.monotonic() - started, 3))
        if len(found) == len(keys) or time.monotonic() >= deadline:
            return found
        time.sleep(POLL_S)


def collect_roster(store: dist.Store, nnodes: int, deadline: float, started: float) -> dict:
    """Node 0: wait for node/<k> of every node until the deadline, publish and return the roster.
    joined_s: seconds after node 0 started that the node's registration was seen."""
    keys = [f"node/{k}" for k in range(nnodes)]
    found = wait_for_all(store, keys, deadline, started)
    nodes = {k: found[keys[k]][0] | {"joined_s": found[keys[k]][1]} for k in range(nnodes) if keys[k] in found}
    roster = {"present": sorted(nodes), "nodes": {str(k): v for k, v in nodes.items()}}
    post(store, "roster", roster)
    return roster


def roster_ranks(roster: dict) -> tuple[list[int], dict[int, int]]:
    """(processes per present node in node order, node rank -> its first global rank)."""
    sizes = [roster["nodes"][str(k)]["nproc"] for k in roster["present"]]
    offsets = {k: sum(sizes[:i]) for i, k in enumerate(roster["present"])}
    return sizes, offsets


# ----------------------------------------------------------------------------------------------
# TCP reachability


class Listener:
    """Accepts and closes connections on an ephemeral port until closed (daemon thread)."""

    def __init__(self):
        self.sock = socket.create_server(("", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
                conn.close()
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def probe(addr: str, port: int, timeout_s: float) -> object:
    """TCP connect time in ms, or the error as a string."""
    start = time.perf_counter()
    try:
        with socket.create_connection((addr, port), timeout=timeout_s):
            return round((time.perf_counter() - start) * 1e3, 3)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e} ({addr}:{port})"


def own_address(master_addr: str, master_port: int) -> str:
    """The address other nodes reach this one at: the source address of the route to the master."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, master_port))  # UDP: picks a route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def probe_peers(peers: dict[int, tuple[str, int]], timeout_s: float) -> dict[int, object]:
    return {k: probe(addr, port, timeout_s) for k, (addr, port) in sorted(peers.items())}


def wait_done(store: dist.Store, expected: int, timeout_s: float, key: str = "done") -> Optional[int]:
    """Host side: keep the store served until `expected` processes said they read the verdict."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = store.add(key, 0)
        if n >= expected:
            return n
        time.sleep(POLL_S)
    return None
