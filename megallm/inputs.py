"""Every file and directory a training run is handed, checked before any process group exists,
and `refuse`, which makes sure the reasons reach the user under torchrun.

`check_inputs(cfg)` returns one line per problem, naming the flag, the file and what to do; it is
cheap (headers and small files only), deterministic, and runs on every rank, so every rank reaches
the same verdict. The full token scan of the data (megallm.data.check.check_data) is separate:
it reads every token, and the launcher runs it on rank 0 only.

Checkpoint directories are read through their on-disk layout (megallm/checkpoint/format.py's
module docstring): `latest_checkpointed_iteration.txt`, `iter_NNNNNNN/meta.json`. Nothing here
loads tensors.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from megallm.config import Config

LATEST = "latest_checkpointed_iteration.txt"
# Model fields that give the weights their shapes: a checkpoint that differs in one cannot be loaded.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size")


def check_inputs(cfg: Config) -> list[str]:
    """Problems with the run's data, tokenizer, exclusion list, checkpoint and log directories."""
    return (_check_data(cfg) + _check_tokenizer(cfg) + _check_exclude_samples(cfg)
            + check_checkpoint_dirs(cfg) + _check_output_dir("--log-dir", cfg.logging.log_dir))


def _check_data(cfg: Config) -> list[str]:
    from megallm.data.blend import DataConfigError, parse_blend
    from megallm.data.check import check_headers

    try:
        prefixes, _ = parse_blend(list(cfg.data.data_path))
    except DataConfigError as e:
        return [str(e)]
    return [f"--data-path: {finding}" for prefix in prefixes for finding in check_headers(prefix)]


def _check_tokenizer(cfg: Config) -> list[str]:
    path = cfg.data.tokenizer_model
    if not path:
        return []
    if not os.path.isfile(path):
        return [f"--tokenizer-model {path}: no such file (give the SentencePiece .model the data was tokenized with)"]
    from megallm.data.tokenizer import TokenizerError, load_tokenizer

    try:
        load_tokenizer(path)
    except TokenizerError as e:
        return [f"--tokenizer-model: {e}"]
    return []


def _check_exclude_samples(cfg: Config) -> list[str]:
    path = cfg.data.exclude_samples
    if not path:
        return []
    from megallm.data.sampler import ExcludeListError, load_exclude_samples

    if not os.path.isfile(path):
        return [f"--exclude-samples {path}: no such file (write one with tools/spike_report.py --skip-list)"]
    try:
        load_exclude_samples(path)
    except ExcludeListError as e:
        return [f"--exclude-samples: {e}"]
    except (OSError, UnicodeDecodeError) as e:
        return [f"--exclude-samples {path}: cannot be read ({getattr(e, 'strerror', None) or e})"]
    return []


def _check_output_dir(flag: str, path: Optional[str]) -> list[str]:
    """A directory the run will create or write into: not a file, and creatable."""
    if not path:
        return []
    p = Path(path)
    if p.exists() and not p.is_dir():
        return [f"{flag} {path}: is a file, not a directory; name a new or existing directory"]
    existing = next(a for a in [p, *p.absolute().parents] if a.exists())
    if not existing.is_dir():
        return [f"{flag} {path}: {existing} is a file, so the directory cannot be created; name another directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{flag} {path}: {existing} is not writable; name a directory you can write"]
    return []


def _complete_iterations(root: Path) -> list[int]:
    its = []
    for d in root.glob("iter_*"):
        number = d.name[len("iter_"):]
        if d.is_dir() and number.isdigit() and (d / "meta.json").is_file():
            its.append(int(number))
    return sorted(its)


def _saved_model(ckpt: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the model section of the checkpoint's config, None) or (None, what is wrong)."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{ckpt / 'meta.json'}: unreadable ({getattr(e, 'msg', None) or e})"
    model = meta.get("config", {}).get("model") if isinstance(meta, dict) else None
    return (model, None) if isinstance(model, dict) else (None, f"{ckpt / 'meta.json'}: no model config in it")


def check_checkpoint_dirs(cfg: Config) -> list[str]:
    """--load and --save, as the launcher is given them: the problems that would otherwise show up
    as a silent fresh start, a traceback after the process groups exist, or a crash at the first save."""
    errors = _check_output_dir("--save", cfg.checkpoint.save)
    load = cfg.checkpoint.load
    if not load:
        return errors
    root = Path(load)
    same_as_save = cfg.checkpoint.save and os.path.abspath(load) == os.path.abspath(cfg.checkpoint.save)
    if not root.exists():
        if not same_as_save:  # --load = --save is the restartable-job pattern: the first start finds nothing
            errors.append(f"--load {load}: no such directory (give a run's --save directory or one iter_N "
                          f"directory; to start fresh, leave --load out)")
        return errors
    if not root.is_dir():
        return errors + [f"--load {load}: is a file; give a run's --save directory or one of its iter_N directories"]
    if (root / "meta.json").exists() or root.name.startswith("iter_"):
        candidates = [root]
    else:
        latest = root / LATEST
        if latest.exists():
            text = latest.read_text(errors="replace").strip()
            if not text.isdigit():
                return errors + [f"--load {load}: {latest} holds {text[:40]!r}, not an iteration number; restore it "
                                 f"(the newest complete iter_N), or remove it to load the newest complete checkpoint"]
        its = _complete_iterations(root)
        if latest.exists() and not its:
            return errors + [f"--load {load}: {latest} names iteration {text} but no complete iter_N/meta.json "
                             f"exists; restore the checkpoint, or leave --load out to start fresh"]
        if not its and ((root / "config.json").exists() or any(root.glob("*.safetensors"))):
            return errors + [f"--load {load}: a HuggingFace checkpoint, not a megallm one; convert it first with "
                             f"tools/convert_checkpoint.py --from hf --to megallm"]
        candidates = [root / f"iter_{i:07d}" for i in reversed(its)]
    for ckpt in candidates:  # the first readable one is what load picks (it falls back past damaged ones)
        saved, problem = _saved_model(ckpt)
        if problem:
            if len(candidates) == 1:
                errors.append(f"--load {load}: {problem}")
            continue
        now = cfg.to_dict()["model"]
        diffs = [f"{k}={saved[k]} (run: {now[k]})" for k in SHAPE_FIELDS if k in saved and saved[k] != now[k]]
        if diffs:
            errors.append(f"--load {load}: {ckpt.name} holds another model: {', '.join(diffs)}; pass the model "
                          f"flags (or --config) the checkpoint was saved with")
        break
    return errors


# How long a rank other than local rank 0 waits for it to print the reasons for refusing a run.
REFUSE_WAIT_S = 60.0


def _torchrun_attempt_dir() -> Optional[Path]:
    """The directory torchrun's agent keeps for this restart attempt, shared by the node's ranks
    (TORCHELASTIC_ERROR_FILE is ATTEMPT_DIR/LOCAL_RANK/error.json); None outside torchrun."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    return Path(error_file).parents[1] if error_file else None


def refuse(lines: list[str]) -> int:
    """Print why the run cannot start, once per machine, and return exit status 2 on every rank.

    Under torchrun the first rank to exit ends its siblings, output unwritten: were only rank 0 to
    print, a rank that got there first would leave the user with a bare ChildFailedError. So every
    rank reaches the same verdict, local rank 0 prints and then leaves a marker in the attempt's
    directory, and the other ranks exit only once the marker is there (or print the lines
    themselves after REFUSE_WAIT_S, should local rank 0 never get there)."""
    def show() -> None:
        print("\n".join(lines), file=sys.stderr, flush=True)

    attempt = _torchrun_attempt_dir()
    if attempt is None:  # one process, or a launcher that does not kill a rank's siblings
        if int(os.environ.get("RANK", 0)) == 0:
            show()
        return 2
    marker = attempt / "megallm_refused"
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        show()
        try:
            marker.touch()
        except OSError:
            pass  # the others print after their wait
        return 2
    deadline = time.monotonic() + REFUSE_WAIT_S
    while time.monotonic() < deadline:
        if marker.exists():
            return 2
        time.sleep(0.05)
    show()
    return 2
