"""What to change, from the config and the run; every line carries its evidence.

The config rules are megallm/training/hyperparams.py's table (the launcher's lint reads the same
one), each with its public source; the run's own evidence (spikes, non-finite steps, documents
seen in several spikes) is added here.
"""

from __future__ import annotations

from typing import Optional

from megallm.config import Config
from megallm.training.hyperparams import violations


def _iterations(its: list[int], limit: int = 8) -> str:
    its = sorted(set(its))
    shown = ", ".join(str(i) for i in its[:limit])
    return shown + (f" (+{len(its) - limit} more)" if len(its) > limit else "")


def advise(cfg: Optional[Config], spikes: list[dict], repeated_documents: list[dict],
           config_source: str) -> list[dict]:
    """[{"rule", "message", "evidence"}]; an empty list means nothing to change."""
    out = []
    spike_its = [s["iteration"] for s in spikes]
    in_run = (f"{len(spike_its)} spikes in this run (iterations {_iterations(spike_its)})" if spike_its
              else "no spikes in this run")

    def add(rule: str, message: str, evidence: str) -> None:
        out.append({"rule": rule, "message": message, "evidence": evidence})

    if cfg is not None:
        for rule, evidence in violations(cfg):
            context = f" ({config_source})" if rule.name == "dropout" else f" ({config_source}); {in_run}"
            add(rule.name, f"{rule.fix}: {rule.why}", evidence + context)

    nonfinite = [s["iteration"] for s in spikes if str(s.get("reason", "")).startswith("nonfinite")]
    if nonfinite:
        add("nonfinite", "non-finite loss or grad norm: check the batch's data (see the table) and, in bf16, "
            "overflow in attention logits or the output layer; a lower lr or longer warmup helps if it recurs",
            f"{len(nonfinite)} non-finite steps at iterations {_iterations(nonfinite)}")

    # Documents that share the same spikes are one finding (a re-run batch repeats all of its
    # documents), so they are grouped into one line per set of spike iterations.
    groups: dict[tuple, list[dict]] = {}
    for doc in repeated_documents:
        groups.setdefault(tuple(doc["iterations"]), []).append(doc)
    for its, docs in groups.items():
        k = max(d["spikes"] for d in docs)
        where = [(d["source"] or f"{d['dataset']} document {d['document']}") + f" ({d['samples']} samples)"
                 for d in docs]
        shown = ", ".join(where[:5]) + (f" (+{len(where) - 5} more)" if len(where) > 5 else "")
        add("repeated_documents", f"the same documents appear in {k} spikes: inspect them and leave their "
            f"samples out of the rerun (spike_report.py --skip-list FILE, then pretrain_llama2.py "
            f"--exclude-samples FILE); a long document spans many samples and can reach several batches "
            f"by chance, a short one cannot",
            f"{len(docs)} document(s) in the batches of iterations {_iterations(list(its))}: {shown}")
    return out
