"""A sweep runner: a grid of trials, each a pure function of its parameters, run on local processes
or on Ray, with every row appended to a JSON Lines results file as soon as it is known.

A trial is a JSON object of parameters (e.g. model, layer, compression spec, seed); its key is a
stable hash of them (`trial_key`). The trial function takes the parameters and returns one row (a
JSON object). The results file holds one line per finished trial:

    {"key": "...", "params": {...}, "row": {...}, "seconds": 1.23, "cpu_seconds": 1.1}

(`seconds`: wall-clock time of the trial where it ran; `cpu_seconds`: the CPU time of that process
meanwhile, all its threads: on a shared machine the wall-clock time also counts waiting.)

Resuming: rerun the same sweep on the same file. Trials whose key is already in the file are not
run again, so a run killed at any moment loses no finished row and duplicates none:

- one process (the driver) writes the file, holding an exclusive lock (fcntl.flock) on it, so two
  sweeps cannot append to the same file at once;
- each row is one os.write of a full line (looped only if the OS writes part of it) followed by
  fsync;
- a line cut short by a kill during a write (the only place a torn line can be: the end) is ignored
  when reading, and cut off before the next run appends.

Executors: "process" (concurrent.futures.ProcessPoolExecutor with the "spawn" start method,
`workers` processes), "ray" (tasks on a Ray cluster: `ray_address`, an already initialised Ray, or
a local instance with `workers` CPUs started and stopped here; `pip install 'tensorslim[ray]'`; a
cluster with Ray's token authentication needs RAY_AUTH_MODE=token and its token, as Ray documents),
or "serial" (in this process, for debugging). Every executor runs a trial the same way
(`execute`: torch set to `threads` threads, then the function), so a deterministic trial gives the
same row on each.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import itertools
import json
import os
import pickle
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorslim._progress import bar
from tensorslim.errors import TensorSlimError

EXECUTORS = ("process", "ray", "serial")
KEY_CHARS = 20  # hex digits of the SHA-256 kept as the trial key (80 bits)

TrialFn = Callable[[dict[str, Any]], Mapping[str, Any]]


class SweepError(TensorSlimError):
    """A trial failed, or the sweep's inputs or results file are not usable."""


# -- trials ---------------------------------------------------------------------------------------
def canonical_json(value: Any, what: str = "trial parameters") -> str:
    """`value` as canonical JSON (sorted keys, no spaces, finite numbers only); SweepError if it
    is not plain JSON data."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SweepError(
            f"{what} must be plain JSON data (dicts with str keys, lists, str, finite numbers, "
            f"bools, None); {exc}: {value!r:.200}"
        ) from None


def trial_key(params: Mapping[str, Any]) -> str:
    """A stable key of a trial: the first KEY_CHARS hex digits of the SHA-256 of its canonical
    JSON (independent of dict order, Python version and process)."""
    if not isinstance(params, Mapping):
        raise SweepError(f"a trial must be a dict of parameters; got {type(params).__name__}")
    text = canonical_json(dict(params))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def grid(axes: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any] | None = None) -> list[dict]:
    """Every combination of the axes' values (the last axis varying fastest), each merged with
    `fixed`: grid({"a": [1, 2], "b": ["x"]}, {"c": 0}) -> [{"c": 0, "a": 1, "b": "x"}, ...]."""
    names = list(axes)
    for name in names:
        if isinstance(axes[name], (str, bytes)) or not isinstance(axes[name], Sequence):
            raise SweepError(f"grid axis {name!r} must be a list of values; got {axes[name]!r:.80}")
        if not axes[name]:
            raise SweepError(f"grid axis {name!r} has no values")
    return [
        {**(fixed or {}), **dict(zip(names, values))}
        for values in itertools.product(*(axes[n] for n in names))
    ]


# -- the results file -----------------------------------------------------------------------------
@dataclass
class Record:
    """One finished trial as stored: its key, parameters, row, and the wall-clock and CPU seconds
    it took (CPU: None in files written without it)."""

    key: str
    params: dict[str, Any]
    row: dict[str, Any]
    seconds: float
    cpu_seconds: float | None = None

    def line(self) -> bytes:
        payload = {
            "key": self.key,
            "params": self.params,
            "row": self.row,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }
        # not sort_keys: a row keeps its key order (a table's columns) when a rerun reads it back;
        # params are canonical already (sorted when the trials were checked)
        return (json.dumps(payload, separators=(",", ":")) + "\n").encode()


@dataclass
class Results:
    """What a results file holds: records by key (file order), the byte length of its complete
    lines, whether a torn last line followed them, and how many duplicate keys were skipped."""

    records: dict[str, Record] = field(default_factory=dict)
    complete_bytes: int = 0
    torn: bool = False
    duplicates: int = 0


def _parse(line: bytes, number: int, path: Path) -> Record:
    where = f"results file {str(path)!r} line {number}"
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SweepError(f"{where} is not JSON ({exc}); the file is damaged") from None
    ok = (
        isinstance(obj, dict)
        and isinstance(obj.get("key"), str)
        and isinstance(obj.get("params"), dict)
        and isinstance(obj.get("row"), dict)
        and isinstance(obj.get("seconds"), (int, float))
    )
    if not ok:
        raise SweepError(
            f"{where} is not a sweep record (an object with key, params, row and seconds)"
        )
    if trial_key(obj["params"]) != obj["key"]:
        raise SweepError(f"{where}: its key does not match its parameters; the file is damaged")
    cpu = obj.get("cpu_seconds")
    cpu = float(cpu) if isinstance(cpu, (int, float)) and not isinstance(cpu, bool) else None
    return Record(obj["key"], obj["params"], obj["row"], float(obj["seconds"]), cpu)


def read_results(path: str | Path) -> Results:
    """The records of a results file (none if it does not exist). A last line without its newline
    is a write cut short and is ignored (`torn`); a key seen again keeps its first record
    (`duplicates` counts the others). SweepError naming the line for any other damage."""
    path = Path(path)
    if not path.exists():
        return Results()
    if not path.is_file():
        raise SweepError(f"results path {str(path)!r} is not a regular file")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    out = Results(complete_bytes=end, torn=end < len(data))
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        rec = _parse(line, number, path)
        if rec.key in out.records:
            out.duplicates += 1
        else:
            out.records[rec.key] = rec
    return out


class _Writer:
    """The driver's append handle on the results file: locked, torn tail cut, fsync per row."""

    def __init__(self, path: Path) -> None:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SweepError(
                    f"results file {str(path)!r} is being written by another sweep (locked); "
                    "wait for it to finish or use another file"
                ) from None
            raise

    def repair(self, results: Results) -> None:
        """Cut a torn last line so the next row starts on a line of its own."""
        if results.torn:
            os.ftruncate(self.fd, results.complete_bytes)
            os.fsync(self.fd)

    def append(self, record: Record) -> None:
        data = record.line()
        view = memoryview(data)
        while view:  # one write of the whole line; the loop only continues a partial write
            view = view[os.write(self.fd, view) :]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)  # releases the lock


# -- running one trial ----------------------------------------------------------------------------
def resolve_fn(fn: TrialFn | str) -> TrialFn:
    """A trial function, or "package.module:function" imported."""
    if callable(fn):
        return fn
    if isinstance(fn, str) and fn.count(":") == 1:
        module, _, name = fn.partition(":")
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise SweepError(f"cannot import trial function {fn!r}: {exc}") from None
        if callable(obj):
            return obj
    raise SweepError(
        f"the trial function must be a callable or 'package.module:function'; got {fn!r:.80}"
    )


def execute(
    fn: TrialFn | str, params: dict[str, Any], threads: int
) -> tuple[dict, float, float]:
    """Run one trial where it lands (worker process, Ray task or this process): torch on
    `threads` threads, then `fn(params)`; (row, wall-clock seconds, CPU seconds)."""
    import torch

    torch.set_num_threads(threads)
    start, cpu = time.perf_counter(), time.process_time()
    row = resolve_fn(fn)(dict(params))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if not isinstance(row, Mapping):
        raise SweepError(f"a trial function must return a dict (one row); got {type(row).__name__}")
    return dict(row), seconds, cpu


def _failed(params: dict[str, Any], exc: BaseException) -> SweepError:
    shown = canonical_json(params)
    if len(shown) > 300:
        shown = shown[:297] + "..."
    return SweepError(
        f"trial {trial_key(params)} {shown} failed: {type(exc).__name__}: {exc}; the rows "
        "finished before it are saved, rerun to resume"
    )


# -- executors ------------------------------------------------------------------------------------
Done = Iterator[tuple[dict[str, Any], tuple[dict, float, float]]]  # (params, execute's result)


def _serial(fn: TrialFn | str, todo: list[dict], threads: int) -> Done:
    import torch

    saved = torch.get_num_threads()
    try:
        for params in todo:
            try:
                result = execute(fn, params, threads)
            except Exception as exc:
                raise _failed(params, exc) from exc
            yield params, result
    finally:
        torch.set_num_threads(saved)


PARENT_POLL = 0.5  # seconds between a worker's checks that the driver is still alive


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the driver process `parent` is gone. A driver
    killed by a signal runs no cleanup, and its idle workers would otherwise wait for work forever
    (reparented, holding their memory)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name="tensorslim-parent-watch", daemon=True).start()


def _processes(fn: TrialFn | str, todo: list[dict], workers: int, threads: int) -> Done:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                               initializer=_exit_with_parent, initargs=(os.getpid(),))  # fmt: skip
    try:
        pending = {pool.submit(execute, fn, p, threads): p for p in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                params = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:
                    raise _failed(params, exc) from exc
                yield params, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError(
            "executor 'ray' needs Ray: pip install 'tensorslim[ray]' (or pip install ray)"
        ) from None
    return ray


def _ray(
    fn: TrialFn | str, todo: list[dict], workers: int, threads: int, address: str | None
) -> Done:
    ray = _import_ray()
    started = False
    if address is not None:
        if ray.is_initialized():
            raise SweepError(
                "Ray is already initialised in this process; leave ray_address unset to use it"
            )
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:
            raise SweepError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
        started = True
    elif not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        started = True
    task = ray.remote(num_cpus=threads, max_retries=0)(execute)
    try:
        pending = {task.remote(fn, p, threads): p for p in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                params = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    for other in pending:
                        with contextlib.suppress(Exception):
                            ray.cancel(other, force=True)
                    cause = getattr(exc, "cause", None) or exc
                    raise _failed(params, cause) from exc
                yield params, result
    finally:
        if started:
            ray.shutdown()


# -- the sweep ------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """Rows of every trial of the grid (grid order), the records, and what this call did."""

    rows: list[dict[str, Any]]
    records: list[Record]
    ran: int
    reused: int
    seconds: float

    def trial_seconds(self) -> list[float]:
        """Wall-clock seconds of every trial (grid order)."""
        return [r.seconds for r in self.records]

    def trial_cpu_seconds(self) -> list[float | None]:
        """CPU seconds of every trial (grid order; None where the file did not record it)."""
        return [r.cpu_seconds for r in self.records]


def _check_trials(trials: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(trials, (str, bytes, Mapping)) or not isinstance(trials, Sequence):
        raise SweepError(f"trials must be a list of dicts; got {type(trials).__name__}")
    keyed: list[tuple[str, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for i, params in enumerate(trials):
        key = trial_key(params)
        if key in seen:
            raise SweepError(
                f"trials {seen[key]} and {i} have the same parameters "
                f"({canonical_json(dict(params))[:200]}); each trial must be distinct"
            )
        seen[key] = i
        keyed.append((key, json.loads(canonical_json(dict(params)))))
    return keyed


def _check_options(executor: str, workers: int | None, threads: int) -> int:
    if executor not in EXECUTORS:
        raise SweepError(f"executor must be one of {', '.join(map(repr, EXECUTORS))}; got {executor!r}")
    if type(threads) is not int or threads < 1:
        raise SweepError(f"threads must be an integer >= 1; got {threads!r}")
    if workers is None:
        return max(1, (os.cpu_count() or 1) // threads)
    if type(workers) is not int or workers < 1:
        raise SweepError(f"workers must be an integer >= 1; got {workers!r}")
    return workers


def _check_picklable(fn: TrialFn | str, executor: str) -> None:
    if executor != "process" or isinstance(fn, str):
        return
    try:
        pickle.dumps(fn)
    except Exception:
        raise SweepError(
            f"the trial function {getattr(fn, '__qualname__', fn)!r} cannot be sent to worker "
            "processes: give a function defined at module level (not a lambda or closure), or "
            "'package.module:function'"
        ) from None


def run_sweep(
    fn: TrialFn | str,
    trials: Sequence[Mapping[str, Any]],
    results: str | Path,
    *,
    executor: str = "process",
    workers: int | None = None,
    threads: int = 1,
    ray_address: str | None = None,
    progress: bool = False,
    description: str = "Trials",
) -> SweepResult:
    """Run every trial of `trials` not yet in the `results` file and append its row there; return
    the rows of all trials (those found in the file and those run now) in trial order.

    fn: the trial function (module level, so worker processes can import it) or
    "package.module:function"; it gets a copy of the parameters and returns a dict. executor:
    "process" (`workers` spawned processes, default cpu_count // threads), "ray" (`ray_address`
    of a running cluster, else an initialised Ray, else a local Ray with `workers` CPUs) or
    "serial". threads: torch threads per trial. A failing trial stops the sweep with a SweepError
    naming it; the rows finished before are kept, and rerunning resumes.
    """
    executor = executor.lower() if isinstance(executor, str) else executor
    workers = _check_options(executor, workers, threads)
    keyed = _check_trials(trials)
    fn_ref = fn if isinstance(fn, str) else resolve_fn(fn)
    if isinstance(fn_ref, str):
        resolve_fn(fn_ref)  # fail here, not in a worker
    _check_picklable(fn_ref, executor)
    if executor == "ray":
        _import_ray()
    path = Path(results)
    if path.exists() and not path.is_file():
        raise SweepError(f"results path {str(path)!r} is not a regular file")
    start = time.perf_counter()
    writer = _Writer(path)
    try:
        found = read_results(path)
        writer.repair(found)
        records = dict(found.records)
        todo = [params for key, params in keyed if key not in records]
        reused = len(keyed) - len(todo)
        if todo:
            if executor == "serial":
                done = _serial(fn_ref, todo, threads)
            elif executor == "process":
                done = _processes(fn_ref, todo, workers, threads)
            else:
                done = _ray(fn_ref, todo, workers, threads, ray_address)
            label = f"{description} ({reused} done before)" if reused else description
            with contextlib.closing(done), bar(progress, label, len(todo)) as update:
                for params, (row, seconds, cpu) in done:
                    canonical_json(row, "a trial's row")  # refuse a row JSON cannot hold
                    rec = Record(trial_key(params), params, row, seconds, cpu)
                    writer.append(rec)
                    records[rec.key] = rec
                    update()
    finally:
        writer.close()
    ordered = [records[key] for key, _ in keyed]
    return SweepResult(
        [dict(r.row) for r in ordered], ordered, len(keyed) - reused, reused,
        time.perf_counter() - start,
    )

