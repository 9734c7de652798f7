"""The differential test matrix's large slice: sharded vs unsharded on hundreds of random cases.

Each case (``torchrec_compress.testing.matrix``) is a TorchRec model with random tables,
a compression stack, a plan (the planner's own or a forced one), a route, a training recipe and a
world size; it is compared with the unsharded compressed model (forward and 3 training steps
through a plain loop and ``TrainPipelineSparseDist``).  Prints one line per case, then a
pass / refuse / fail table by method, plan and model, and the refusal messages.

Usage::

    python -m benchmarks.matrix --seed 0 --count 320 --json runs/matrix.json
    python -m benchmarks.matrix --case 's0-...'        # one case again, by name (from --json)
"""

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from torchrec_compress.testing.matrix import run_matrix
from torchrec_compress.testing.matrix_cases import (
    METHODS,
    MODELS,
    PLANS,
    Case,
    Outcome,
    generate_cases,
)
from torchrec_compress.testing.multiprocess import run_multiprocess


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=320, help="number of random cases")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--plans", default=",".join(PLANS))
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--chunk", type=int, default=25, help="cases per spawned process group")
    p.add_argument("--json", type=Path, help="write every case and outcome here")
    p.add_argument("--case", action="append", default=[], help="run only these case names")
    return p.parse_args(argv)


def _table(outcomes: list[Outcome], cases: dict[str, Case], axis: str) -> str:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        counts[str(getattr(cases[o.case], axis))][o.status] += 1
    lines = [f"{axis:<22} {'pass':>5} {'refuse':>6} {'fail':>5}"]
    for key in sorted(counts):
        c = counts[key]
        lines.append(f"{key:<22} {c['pass']:>5} {c['refuse']:>6} {c['fail']:>5}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cases = generate_cases(
        args.seed,
        args.count,
        models=args.models.split(","),
        methods=args.methods.split(","),
        plans=args.plans.split(","),
        world_sizes=[int(w) for w in args.world_sizes.split(",")],
    )
    if args.case:
        wanted = set(args.case)
        cases = [c for c in cases if c.name in wanted]
        if not cases:
            print(f"no case named {sorted(wanted)} among the generated ones", file=sys.stderr)
            return 2
    by_name = {c.name: c for c in cases}
    start = time.monotonic()
    outcomes = run_matrix(cases, run_multiprocess, chunk=args.chunk)
    elapsed = time.monotonic() - start
    for o in outcomes:
        errors = " ".join(f"{k}={v:.1e}" for k, v in o.errors.items())
        print(f"{o.status:<6} {o.case}  [{','.join(o.sharding)}] {errors}")
        if o.status != "pass":
            print("       " + o.detail.replace("\n", "\n       "))
    print()
    for axis in ("method", "plan", "model", "world_size", "route", "recipe"):
        print(_table(outcomes, by_name, axis))
        print()
    totals = Counter(o.status for o in outcomes)
    planned = Counter(s for o in outcomes for s in o.sharding)
    print("sharding types the plans used:", dict(sorted(planned.items())))
    refusals = Counter(o.detail.split("\n")[0][:160] for o in outcomes if o.status == "refuse")
    if refusals:
        print("refusals:")
        for message, n in refusals.most_common():
            print(f"  {n:>4}  {message}")
    print(
        f"\n{len(outcomes)} cases in {elapsed / 60:.1f} min: {totals['pass']} pass, "
        f"{totals['refuse']} refuse, {totals['fail']} fail"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                [{**o.__dict__, "spec": by_name[o.case].to_dict()} for o in outcomes], indent=1
            )
        )
    return 1 if totals["fail"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
