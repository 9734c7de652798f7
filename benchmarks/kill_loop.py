"""Random-instant kills of ``examples.dlrm.main``, each resumed until it finishes, compared with an
uninterrupted run (issue 15).

The pipeline is the fault-injection tests' tiny model (``tests/examples/test_fault_injection.py``)
on 10x their training rows, so that training and fine-tuning last a second or so: train 2 epochs,
AFM rank 4, fine-tune 2 epochs, a checkpoint every 20 steps, in 1 process and in 2 (torchrun).
Each *chain* starts the command on a fresh ``--out`` and SIGKILLs it at a random instant, then
re-runs the same command with ``--resume`` (killed again, at another random instant, with
probability ``--again``), until a run finishes.  Its ``result.json`` values and its final
checkpoint's tensors (``OUT/checkpoint``) are then compared with the uninterrupted run's: at
most ``1e-6`` apart, *resumed*; else *different*.  A run that exits with an error is *refused*
when its last error line says what to run (names a flag or the command), else *failed*; a run
that outlives ``--timeout``, or processes of a run that outlive its kill by ``LINGER_S``
(workers of a killed torchrun), are *hung*.

Kills: *tree* SIGKILLs the launched process and every process under it at once (for 2 processes:
torchrun and both workers); *launcher* SIGKILLs torchrun alone (2 processes only), and its
workers must then end by themselves.  A chain's first kill is aimed at one phase of the
uninterrupted run's timeline (start-up, training, saving, compression, fine-tuning, shutdown,
taken in turn): a uniform instant inside that phase, as an offset from the fault point that
starts its stretch of the phase, so that short phases (a save takes tens of milliseconds) are
hit too; a resumed run is killed after a delay uniform over the uninterrupted run's length.
The phase a kill actually landed in is read from the killed run's own fault-point log
(``TORCHREC_COMPRESS_FAULT_LOG``: rank 0 logs every fault point it passes, with the time).

Example::

    python benchmarks/kill_loop.py --kills 60 --work /tmp/kill_loop
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import markdown_table, run_header

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchrec_compress.faults import FAULT_ENV, FAULT_LOG_ENV  # noqa: E402

TINY = [
    "--dataset", "synthetic",
    "--data-opt", "train_rows=20000", "val_rows=1000", "test_rows=1000",
    "num_embeddings=100,200,300", "pooling=1,3,1", "block_rows=500",
    "--embedding-dim", "8", "--dense-arch", "16", "--over-arch", "16",
    "--eval-batch-size", "1024", "--threads", "1",
]  # fmt: skip
PIPELINE = [
    "--epochs", "2", "--compress", "afm", "--rank", "4", "--finetune-epochs", "2",
    "--checkpoint-every", "20",
]  # fmt: skip
PHASES = ("start-up", "training", "saving", "compression", "fine-tuning", "shutdown")
OUTCOMES = ("resumed", "refused", "different", "hung", "failed")
# inside a save (save.rotated ends it: the new checkpoint is in place)
SAVE_POINTS = {"save.begin", "save.written", "save.manifest"}
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# a killed run's processes must be gone by then (the kernel ends a dead torchrun's workers
# in milliseconds; orphaned, they would run on for seconds and write result.json)
LINGER_S = 2.0
TOLERANCE = 1e-6


def command(world: int, out: Path, resume: bool) -> list[str]:
    launch = [sys.executable]
    if world > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    batch = ["--batch-size", str(256 // world)]
    tail = ["--resume"] if resume else []
    return [*launch, "-m", "examples.dlrm.main", *TINY, *batch, *PIPELINE, "--out", str(out), *tail]


def events(log: Path) -> list[tuple[str, float]]:
    """``(fault point, time)`` of every point rank 0 passed (a line cut by a kill is dropped)."""
    found = []
    for line in log.read_text().splitlines() if log.exists() else []:
        name, _, stamp = line.partition(" ")
        try:
            found.append((name, float(stamp)))
        except ValueError:
            continue
    return found


def phase_at(timeline: list[tuple[str, float]], instant: float) -> str:
    """The phase a run was in at ``instant``, from the fault points it had passed."""
    passed = [name for name, stamp in timeline if stamp <= instant]
    if not passed:
        return "start-up"
    if "final.evaluate" in passed:
        return "shutdown"
    if passed[-1] in SAVE_POINTS:
        return "saving"
    if "compress.begin" not in passed:
        return "training"
    since = passed[len(passed) - 1 - passed[::-1].index("compress.begin") :]
    if "compress.stage" in since and "train.step" in since[since.index("compress.stage") :]:
        return "fine-tuning"
    return "compression"


@dataclass(frozen=True)
class Window:
    """A stretch of one phase in the uninterrupted run: it starts ``length`` seconds before the
    next fault point, at the ``occurrence``-th pass of fault point ``anchor`` (``None``: at
    launch)."""

    phase: str
    anchor: str | None
    occurrence: int
    length: float


def phase_windows(timeline: list[tuple[str, float]], start: float, end: float) -> list[Window]:
    """The uninterrupted run's timeline cut into phase windows, each anchored at a fault point."""
    anchors: list[tuple[str | None, int, float]] = [(None, 0, start)]
    seen: Counter[str] = Counter()
    for name, stamp in timeline:
        seen[name] += 1
        anchors.append((name, seen[name], stamp))
    ends = [stamp for *_, stamp in anchors[1:]] + [end]
    return [
        Window(phase_at(timeline, a), anchor, occurrence, b - a)
        for (anchor, occurrence, a), b in zip(anchors, ends, strict=True)
        if b > a
    ]


def aim(windows: list[Window], phase: str, rng: random.Random) -> tuple[Window, float]:
    """A window of ``phase`` (chosen by length) and a uniform offset inside it."""
    chosen = [w for w in windows if w.phase == phase]
    point = rng.uniform(0, sum(w.length for w in chosen))
    for window in chosen:
        if point <= window.length:
            return window, point
        point -= window.length
    return chosen[-1], chosen[-1].length


def wait_for_anchor(run: Run, window: Window) -> float | None:
    """When the run passed the window's anchor (launch, or a fault point's occurrence);
    ``None`` if it ended first."""
    if window.anchor is None:
        return run.started
    while run.proc.poll() is None:
        passed = [t for name, t in events(run.log) if name == window.anchor]
        if len(passed) >= window.occurrence:
            return passed[window.occurrence - 1]
        time.sleep(0.005)
    return None


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)``; ``None`` once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents[int(entry)] = stat[1]
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p == frontier[-1]]
        frontier.pop()
        found += children
        frontier += children
    return found


def running_on(out: Path) -> list[int]:
    """Processes whose command line names ``out``: every process of a chain's runs, including
    a worker started between the scan of the tree and the kill."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            words = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.isdigit() and str(out).encode() in words:
            found.append(int(entry))
    return alive(found)


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if (stat := _stat(p)) is not None and stat[0] != "Z"]


def sigkill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Run:
    """One launched command."""

    proc: subprocess.Popen[bytes]
    started: float
    log: Path
    output: Path

    @classmethod
    def launch(cls, world: int, out: Path, resume: bool, name: str) -> Run:
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k != FAULT_ENV}
        log, output = out.parent / f"{name}.points", out.parent / f"{name}.log"
        env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **{FAULT_LOG_ENV: str(log)})
        with open(output, "wb") as sink:
            started = time.time()
            proc = subprocess.Popen(
                command(world, out, resume), cwd=ROOT, env=env, stdout=sink, stderr=sink
            )
        return cls(proc, started, log, output)

    def last_line(self) -> str:
        """The error a failed run ended with (a worker's own, not torchrun's summary)."""
        lines = [ln for ln in self.output.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.search(r"(Error|Exit|error:)", ln)]
        workers = [ln for ln in errors if re.match(r"\[rank\d+\]: \w+(Error|Exit)", ln)]
        return (workers or errors or lines or [""])[-1].strip()


@dataclass
class Reference:
    out: Path
    duration: float
    windows: list[Window]

    def seconds_in(self, phase: str) -> float:
        return sum(w.length for w in self.windows if w.phase == phase)


def reference_run(world: int, work: Path, timeout: float) -> Reference:
    out = work / f"reference{world}"
    run = Run.launch(world, out, resume=False, name=out.name)
    if run.proc.wait(timeout) != 0:
        raise SystemExit(f"the uninterrupted {world}-process run failed: {run.last_line()}")
    end = time.time()
    return Reference(out, end - run.started, phase_windows(events(run.log), run.started, end))


def _flat_state(path: Path) -> dict[str, Any]:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    file = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(file))
    state = torch.load(file, weights_only=False)
    file.unlink()
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value.double()

    walk("", state)
    return flat


def _numbers(value: Any, where: str = "result") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k in sorted(value):
            yield from _numbers(value[k], f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")
    else:
        yield where, value


def difference(out: Path, reference: Path) -> tuple[float, str]:
    """Largest difference between two runs' result.json values and final checkpoint tensors."""
    worst, where = 0.0, ""
    got = dict(_numbers(json.loads((out / "result.json").read_text())))
    want = dict(_numbers(json.loads((reference / "result.json").read_text())))
    if got.keys() != want.keys():
        return math.inf, f"result.json keys differ: {sorted(got.keys() ^ want.keys())[:3]}"
    for key, value in want.items():
        if isinstance(value, float) or isinstance(got[key], float):
            diff = 0.0 if value == got[key] else abs(float(got[key]) - float(value))
        else:
            diff = 0.0 if value == got[key] else math.inf
        if diff > worst or math.isnan(diff):
            worst, where = diff, key
    tensors, expected = _flat_state(out / "checkpoint"), _flat_state(reference / "checkpoint")
    if tensors.keys() != expected.keys():
        return math.inf, "the final checkpoints hold different tensors"
    for key, value in expected.items():
        diff = float((tensors[key] - value).abs().max()) if value.numel() else 0.0
        if diff > worst or math.isnan(diff):
            worst, where = diff, f"checkpoint{key}"
    return worst, where


@dataclass
class Kill:
    world: int
    mode: str
    phase: str
    delay: float
    resumed_run: bool


@dataclass
class Chain:
    world: int
    mode: str
    kills: list[Kill] = field(default_factory=list)
    outcome: str = ""
    detail: str = ""
    runs: int = 0


def kill_at(run: Run, instant: float, mode: str, out: Path) -> tuple[float, list[int]] | None:
    """SIGKILL the run (``mode``) at ``instant``; ``None`` if it ended before.  Returns the time
    of the kill and the processes still running ``LINGER_S`` later (killed then)."""
    try:
        run.proc.wait(max(0.0, instant - time.time()))
        return None
    except subprocess.TimeoutExpired:
        pass
    tree = descendants(run.proc.pid)
    killed = time.time()
    sigkill([run.proc.pid, *(tree if mode == "tree" else [])])
    run.proc.wait()
    deadline = time.time() + LINGER_S
    while running_on(out) and time.time() < deadline:
        time.sleep(0.05)
    lingering = running_on(out)
    sigkill(lingering)
    return killed, lingering


def run_chain(
    index: int,
    world: int,
    mode: str,
    first: tuple[Window, float],
    reference: Reference,
    args: argparse.Namespace,
    rng: random.Random,
) -> Chain:
    """Run, kill, resume (and maybe kill again) until a run ends; judge how it ended."""
    out = args.work / f"chain{index:03d}" / "run"
    out.parent.mkdir(parents=True)
    chain = Chain(world, mode)
    aimed: tuple[Window, float] | float | None = first
    while True:
        run = Run.launch(world, out, resume=chain.runs > 0, name=f"run{chain.runs}")
        chain.runs += 1
        if aimed is not None:
            if isinstance(aimed, tuple):  # an offset into a phase window, after its anchor
                anchor = wait_for_anchor(run, aimed[0])
                instant = math.inf if anchor is None else anchor + aimed[1]
            else:  # a delay after launch
                instant = run.started + aimed
            if (kill := kill_at(run, instant, mode, out)) is not None:
                killed, lingering = kill
                phase = phase_at(events(run.log), killed)
                chain.kills.append(Kill(world, mode, phase, killed - run.started, chain.runs > 1))
                if lingering:
                    chain.outcome = "hung"
                    chain.detail = f"processes {lingering} outlived the kill by {LINGER_S:.0f} s"
                    return chain
                again = len(chain.kills) < args.max_kills and rng.random() < args.again
                aimed = rng.uniform(0, reference.duration) if again else None
                continue
        try:
            code = run.proc.wait(args.timeout)
        except subprocess.TimeoutExpired:
            sigkill([run.proc.pid, *descendants(run.proc.pid)])
            run.proc.wait()
            chain.outcome, chain.detail = "hung", f"run {chain.runs} exceeded {args.timeout} s"
            return chain
        if code != 0:
            line = run.last_line()
            says = re.search(r"--[a-z]|same command", line) is not None
            chain.outcome, chain.detail = ("refused" if says else "failed"), line[-300:]
            return chain
        diff, where = difference(out, reference.out)
        chain.outcome = "resumed" if diff <= TOLERANCE else "different"
        chain.detail = f"max |diff| {diff:.3g} ({where})" if diff else "identical"
        if chain.outcome == "resumed" and not args.keep:
            shutil.rmtree(out.parent)
        return chain


def tables(chains: list[Chain]) -> str:
    kills = [(k, c.outcome) for c in chains for k in c.kills]
    by_phase = Counter((k.phase, outcome) for k, outcome in kills)
    rows: list[list[object]] = []
    for phase in PHASES:
        counts = [by_phase[phase, o] for o in OUTCOMES]
        rows.append([phase, *counts, sum(counts)])
    totals = [sum(1 for _, o in kills if o == outcome) for outcome in OUTCOMES]
    rows.append(["**all**", *totals, len(kills)])
    text = markdown_table(["phase killed in", *OUTCOMES, "kills"], rows) + "\n\n"
    by_launch = Counter((k.world, k.mode, outcome) for k, outcome in kills)
    rows = []
    for world, mode in sorted({(k.world, k.mode) for k, _ in kills}):
        counts = [by_launch[world, mode, o] for o in OUTCOMES]
        what = "process tree" if mode == "tree" else "torchrun only"
        rows.append([f"{world} process{'es' if world > 1 else ''}, {what}", *counts, sum(counts)])
    text += markdown_table(["kill", *OUTCOMES, "kills"], rows) + "\n"
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kills", type=int, default=60, help="stop once this many kills were made")
    p.add_argument("--work", type=Path, required=True, help="a new directory for the runs")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--again", type=float, default=0.3, help="chance to kill a resumed run too")
    p.add_argument("--max-kills", type=int, default=3, help="kills per chain at most")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take")
    p.add_argument("--keep", action="store_true", help="keep the runs that resumed correctly")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True)
    header = run_header("Random-instant kills of examples.dlrm.main, resumed with --resume")
    started = time.time()
    references = {world: reference_run(world, args.work, args.timeout) for world in (1, 2)}
    for world, ref in references.items():
        spans = ", ".join(f"{phase} {ref.seconds_in(phase):.2f} s" for phase in PHASES)
        print(f"uninterrupted, {world} process(es): {ref.duration:.1f} s ({spans})", flush=True)
    rng = random.Random(args.seed)
    launches = [(1, "tree"), (2, "tree"), (2, "launcher")]
    chains: list[Chain] = []
    while sum(len(c.kills) for c in chains) < args.kills:
        world, mode = launches[len(chains) % len(launches)]
        ref = references[world]
        phases = [phase for phase in PHASES if ref.seconds_in(phase) > 0]
        target = phases[(len(chains) // len(launches)) % len(phases)]
        window, offset = aim(ref.windows, target, rng)
        chain = run_chain(len(chains), world, mode, (window, offset), ref, args, rng)
        chains.append(chain)
        landed = ", ".join(f"{k.phase} at {k.delay:.2f} s" for k in chain.kills) or "no kill"
        print(
            f"chain {len(chains) - 1}: {world} process(es), {mode}, aimed at {target} "
            f"({offset:.3f} s after {window.anchor or 'launch'} #{window.occurrence}): killed "
            f"in {landed}; {chain.runs} runs -> {chain.outcome} ({chain.detail})",
            flush=True,
        )
    kills = sum(len(c.kills) for c in chains)
    bad = [c for c in chains if c.outcome not in ("resumed", "refused")]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print()
    print(header.rstrip("\n") + f"\n- commit: {commit}")
    print(
        f"- {kills} kills in {len(chains)} chains ({sum(c.runs for c in chains)} runs), "
        f"{(time.time() - started) / 60:.1f} min; tolerance {TOLERANCE:g}; "
        f"hung {sum(c.outcome == 'hung' for c in chains)}, "
        f"different {sum(c.outcome == 'different' for c in chains)}\n"
    )
    print(tables(chains))
    for c in bad:
        print(f"- {c.world} process(es), {c.mode}: {c.outcome}: {c.detail}")
    for c in chains:
        if c.outcome == "refused":
            print(f"- refused: {c.detail}")


if __name__ == "__main__":
    main()
