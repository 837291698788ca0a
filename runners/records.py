"""The run record and the JSONL results store (DESIGN.md, "The run record"): a record started
from the composed config (``new``), its outcome filled in by the runner (``fail`` on an
exception), appended to the store.

Appends are atomic: one ``os.write`` of a whole line under an exclusive ``flock``, then
``fsync``; a half-written line left by a killed writer is skipped (with a warning) on read,
and the next append starts on a fresh line so it never glues onto the fragment.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "failed_correctness", "skipped")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunRecord:
    # identity
    run_id: str
    time: str
    git_commit: str | None
    config: dict
    seed: int
    # what ran
    method: str
    method_params: dict
    impl: str
    real_kernel: bool
    model: str
    task: str
    runner: str
    seq_len: int | None
    batch_size: int | None
    dtype: str
    device: str
    env: dict
    causal: bool | None = None
    # outcome
    status: str = "ok"
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)  # phase -> {p20, p50, p80}
    peak_mem_bytes: dict = field(default_factory=dict)  # phase -> bytes above the inputs
    cost: dict | None = None
    correctness: dict | None = None
    train: dict | None = None
    details: dict = field(default_factory=dict)  # backend names, measuring methods, ...
    identity: dict = field(default_factory=dict)  # what besides the config the run_id covers (``identity``)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


def run_id(config: dict, **extra) -> str:
    """Hash of everything that shapes a result: the resolved config (without where it is
    stored, whether it was forced, or whether methods whose forward is dense attention were
    skipped: a run that trains is the same run either way) plus per-record keys such as the
    sequence length."""
    cfg = {k: v for k, v in config.items() if k not in ("store",)}
    if isinstance(cfg.get("runner"), dict):
        cfg["runner"] = {k: v for k, v in cfg["runner"].items() if k not in ("force", "skip_dense_forward")}
    blob = json.dumps({"config": cfg, **extra}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


GROUPS = ("method", "model", "task", "runner")


def names(cfg) -> dict[str, str]:
    """The method, model, task and runner of a run as their config groups name them: Hydra's
    choices in the attnbench app; elsewhere (``run(cfg)`` from Python) the ``_target_``'s module
    below its package, which is named as its config (methods.dense.Dense: dense,
    tasks.lra.listops.ListOps: lra/listops; tests/test_contract.py holds our configs to it)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except ValueError:  # HydraConfig was not set: outside the app
        choices = {}
    return {g: choices.get(g) or _module_name(str(cfg[g]["_target_"])) for g in GROUPS}


def _module_name(target: str) -> str:
    """tasks.lra.listops.ListOps: lra/listops; a plugin's toy.Toy (a top-level module): toy."""
    parts = target.split(".")[:-1]
    return "/".join(parts[1:] if len(parts) > 1 else parts)


def new(cfg, device, dtype, inputs: dict | None = None, **fields) -> RunRecord:
    """A record of the composed config ``cfg`` (the impl shorthand applied), identified by it,
    the per-record ``fields`` (seq_len) and ``identity`` (the resolved device and dtype, library
    versions, the method's code, the input files: ``inputs`` names those the config does not),
    status ok until the runner says otherwise."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    extra = {k: fields[k] for k in ("seq_len",) if k in fields}
    env = environment(device)
    ident = identity(config, device, dtype, env, inputs)
    base = dict(
        run_id=run_id(config, **extra, identity=ident),
        identity=ident,
        time=now(),
        git_commit=git_commit(),
        config=config,
        seed=int(cfg.seed),
        **names(cfg),
        method_params={k: v for k, v in config["method"].items() if not k.startswith("_")},
        impl=str(cfg.method.get("impl", "reference")),
        real_kernel=False,
        seq_len=None,
        batch_size=int(cfg.model.get("batch_size", 1)),
        dtype=str(dtype).replace("torch.", ""),
        device=str(device),
        env=env,
    )
    base.update(fields)
    return RunRecord(**base)


VERSIONED = ("torch", "triton", "transformers")


def version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def identity(config: dict, device, dtype, env: dict, inputs: dict | None = None) -> dict:
    """What shapes a result besides the config: the resolved device (and GPU model) and dtype
    (``auto`` on a CPU and on a GPU are different runs), the versions of torch, triton and
    transformers, a hash of the method's code (its module and what it imports from methods/,
    kernels included) and a hash of each input file (a checkpoint, a model file, data files:
    any existing file the config names, plus ``inputs``)."""
    target = str(((config.get("method") or {}).get("_target_")) or "")
    files = {**config_files(config), **(inputs or {})}
    return {"device": torch_device_type(device), "gpu": env.get("gpu"),
            "dtype": str(dtype).replace("torch.", ""),
            "versions": {p: version(p) for p in VERSIONED},
            "code": code_hash(target) if target else None,
            "inputs": {k: file_hash(v) if v is not None else None for k, v in sorted(files.items())}}


def torch_device_type(device) -> str:
    return str(device).split(":")[0]


def config_files(config: dict, prefix: str = "") -> dict[str, str]:
    """{dotted key: path} of every string in ``config`` that names an existing file (the store
    aside: it is where results go, not what they come from)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if key in ("store", "hydra"):
            continue
        if isinstance(v, dict):
            out.update(config_files(v, key + "."))
        elif isinstance(v, list):
            out.update(config_files({str(i): x for i, x in enumerate(v)}, key + "."))
        elif isinstance(v, str) and 0 < len(v) < 4096 and ("/" in v or "." in v):
            try:
                if Path(v).is_file():
                    out[key] = v
            except OSError:
                pass
    return out


_FILE_HASHES: dict[tuple, str] = {}


def file_hash(path: str | os.PathLike) -> str | None:
    """sha1 of a file's content (None when it is missing), cached by path, size and mtime."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha1()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


CODE_PACKAGES = ("methods",)


def _module_file(mod: str) -> Path | None:
    base = PROJECT_ROOT.joinpath(*mod.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def code_files(module: str) -> list[Path]:
    """The source files of ``module`` and of every module of methods/ it imports, directly or
    not (a method's kernels, base classes and helpers)."""
    import ast

    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen or mod.split(".")[0] not in CODE_PACKAGES:
            continue
        path = _module_file(mod)
        if path is None:
            continue
        seen[mod] = path
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                todo.append(base)
                todo += [f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")]
    return sorted(set(seen.values()))


def code_hash(target: str) -> str | None:
    """sha1 over the source of the module of ``target`` (a ``_target_``) and what it imports
    from methods/ (``code_files``); None for a target outside the project."""
    files = code_files(target.rpartition(".")[0])
    if not files:
        return None
    h = hashlib.sha1()
    for f in files:
        h.update(str(f.relative_to(PROJECT_ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def load_checkpoint(path, map_location=None):
    """``torch.load(path, weights_only=True)``, failing with an error that names the file: a
    truncated, corrupt or crafted (code-running pickle) checkpoint is refused, never run."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        msg = str(exc)
        if msg.startswith("Weights only load failed"):  # torch's advice first, the reason after it
            if "WeightsUnpickler error:" in msg:
                msg = msg.split("WeightsUnpickler error:", 1)[1]
            reasons = [ln.strip() for ln in msg.splitlines() if ln.strip() and not ln.startswith(
                ("Weights only load failed", "Please file an issue", "Check the documentation"))]
            msg = "refused by the weights-only loader: " + (reasons[0] if reasons else "?")
        first = msg.strip().splitlines()[0][:200] if msg.strip() else ""
        raise ValueError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {first})") from exc


def fail(rec: RunRecord, exc: BaseException) -> None:
    """The record of a run that raised ``exc``: status oom or error, and the error, named by
    its cause (a failed build's cause, not Hydra's wrapper around it); an exception that says
    the run could not start (``not_run``, e.g. its data is absent) gives status skipped and
    "not run: <why> (<detail>)"."""
    from hydra.errors import InstantiationException

    from runners.bench import is_oom

    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    if getattr(exc, "not_run", None):  # e.g. tasks.lra.base.DataAbsent: nothing was run
        rec.status, rec.error = "skipped", f"not run: {exc.not_run} ({exc})"
        return
    rec.status = "oom" if is_oom(exc) else "error"
    rec.error = f"{type(exc).__name__}: {exc}"


def git_commit() -> str | None:
    """HEAD of the project (``-dirty`` when tracked files changed); where the tree is a copy
    without .git (a remote GPU machine), the ``ATTNBENCH_GIT_COMMIT`` the launcher exported."""
    if os.environ.get("ATTNBENCH_GIT_COMMIT"):
        return os.environ["ATTNBENCH_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


PEERS = ("flash-linear-attention", "fla-core", "flash-attn")  # scripts/peers.py compares with them


def environment(device) -> dict:
    """Where a record ran: Python, torch, CUDA, cuDNN, triton, transformers and peer (``PEERS``)
    versions, host, process, threads; on a GPU its name, uuid, driver and the clocks at the
    start (``gpu_clocks``)."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "peers": {p: version(p) for p in PEERS},  # the peer kernels' packages (None: not installed)
        "host": platform.node(),
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cpu_threads": torch.get_num_threads(),
        "gpu": None, "gpu_driver": None, "gpu_clocks": None,
    }
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_uuid"] = str(getattr(props, "uuid", "")) or None  # which physical GPU ran it
        env["gpus_visible"] = torch.cuda.device_count()  # 1 under gpu_pool: the job saw only its own
        env.update(gpu_clocks(torch.device(device).index or 0))
    return env


CLOCK_FIELDS = ("driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
                "temperature.gpu", "power.draw", "pstate")


def gpu_clocks(index: int = 0) -> dict:
    """The GPU's driver and clocks now (``nvidia-smi --query-gpu``): {gpu_driver, gpu_clocks};
    None for each where nvidia-smi is not there or fails. ``index`` counts the visible GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in visible.split(",") if g.strip()] if visible else []
    which = ids[index] if index < len(ids) else str(index)
    try:
        out = subprocess.run(["nvidia-smi", f"--id={which}", "--format=csv,noheader,nounits",
                              f"--query-gpu={','.join(CLOCK_FIELDS)}"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"gpu_driver": None, "gpu_clocks": None}
    if out.returncode != 0 or not out.stdout.strip():
        return {"gpu_driver": None, "gpu_clocks": None}
    vals = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    got = dict(zip(CLOCK_FIELDS, vals))
    return {"gpu_driver": got.pop("driver_version", None), "gpu_clocks": got}


MIN_FREE_BYTES = 1 << 20


def check_writable(path: str | os.PathLike, what: str = "results store", is_dir: bool = False) -> None:
    """Fail now, before any compute, when ``path`` (a file appended to, or a folder written
    into) cannot be written: a parent that is a file, no permission, a read-only or full file
    system. Creates the folders (and an empty store file) it needs."""
    path = Path(path)
    folder = path if is_dir else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if is_dir:
            probe = folder / f".attnbench-write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        st = os.statvfs(folder)
    except OSError as exc:
        raise OSError(exc.errno, f"the {what} {path} cannot be written ({type(exc).__name__}: "
                                 f"{exc.strerror or exc}); nothing was run") from exc
    if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
        raise OSError(f"the {what} {path} is on a full file system ({st.f_bavail * st.f_frsize} bytes "
                      "free); nothing was run")


def append(store: str | os.PathLike, record: RunRecord | dict) -> None:
    """Append one record as one line, atomically with respect to other writers."""
    line = record.to_json() if isinstance(record, RunRecord) else json.dumps(record, sort_keys=True)
    data = (line + "\n").encode()
    path = Path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size:  # a killed writer may have left a fragment: start on a fresh line
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def claim(store: str | os.PathLike, run_id: str):
    """Claim ``run_id`` of ``store`` for this process: yields True when no other process holds
    it (two sweeps on one store never run one job twice), False when another does. The claim is
    an exclusive ``flock`` on ``<store>.claims/<run_id>.lock``, held until the block ends; the
    claim of a killed process ends with it."""
    folder = Path(f"{store}.claims")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file as we opened it: claim the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {platform.node()}\n".encode())
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def read(store: str | os.PathLike) -> list[dict]:
    """All complete records in a store; partial or corrupt lines are skipped with a warning."""
    path = Path(store)
    if not path.exists():
        return []
    out, bad = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict) or "run_id" not in rec:
                    raise ValueError("not a run record")
                out.append(rec)
            except ValueError:
                bad.append(n)
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} partial or corrupt line(s) (line {', '.join(map(str, bad[:5]))})",
            stacklevel=2,
        )
    return out


def done_ids(store: str | os.PathLike) -> set[str]:
    """run_ids that already have an ``ok`` record."""
    return {r["run_id"] for r in read(store) if r.get("status") == "ok"}
