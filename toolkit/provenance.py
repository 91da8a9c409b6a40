"""What reproducing a run needs, recorded once per training session (a resume adds an entry) into
trained/NAME/provenance.json: the code's git commit and whether its tracked files had changed (the diff
is saved beside it), the Python, torch and CUDA versions, the device and thread count, and the
identity of the data and tokenizer. Outside a git checkout the git fields are null."""
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from toolkit.checkpoint import write_atomically
from toolkit.data import data_sha256

PROVENANCE = "provenance.json"
DIFF_PATTERN = "uncommitted_*.diff"  # a dirty tree's changes, one file per session
CODE_ROOT = Path(__file__).resolve().parent.parent  # the project whose git state is recorded
NOT_CODE = (":(exclude)trained",)  # git pathspecs left out of the code's state


def git(root: Path, *args: str) -> str | None:
    """git's output in `root`, or None when git is missing or `root` is not in a checkout."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: Path) -> dict:
    commit = git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None, "git_diff": None}
    # The code's state: trained models (weights, logs) are outputs, not code, even where they are tracked.
    status = git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE)
    diff = git(root, "diff", "HEAD", "--binary", "--", ".", *NOT_CODE) if status else None
    return {"git_commit": commit.strip(), "git_dirty": None if status is None else bool(status), "git_diff": diff}


def data_identity(cfg, tokenizer) -> dict:
    """The hashes of the run's data and tokenizer."""
    return {"data_sha256": data_sha256(cfg.data, cfg.max_docs), "tokenizer": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint}


def cpu_name() -> str:
    try:  # Linux names the model here; platform.processor() is often empty there
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def session_record(cfg, tokenizer, device: torch.device, processes: int, step: int, command: str | None) -> dict:
    """This session's entry; its git_diff text is moved into a file of its own by `append_session`."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from_step": step,
            "command": command, **git_state(CODE_ROOT), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device), "device_name": device_name,
            "threads": torch.get_num_threads(), "processes": processes, **data_identity(cfg, tokenizer)}


def append_session(out: Path, record: dict):
    path = out / PROVENANCE
    try:
        sessions = json.loads(path.read_text())["sessions"] if path.is_file() else []
    except (OSError, ValueError, KeyError, TypeError):  # damaged: kept aside, never a reason to lose a save
        path.replace(path.with_name(PROVENANCE + ".damaged"))
        sessions = []
    record = dict(record)
    if record["git_diff"]:
        diff = out / DIFF_PATTERN.replace("*", str(len(sessions) + 1))
        write_atomically(diff, lambda p: p.write_text(record["git_diff"]))
        record["git_diff"] = diff.name
    sessions.append(record)
    write_atomically(path, lambda p: p.write_text(json.dumps({"sessions": sessions}, indent=2)))
