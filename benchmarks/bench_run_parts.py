"""The parts of a `standard` run that this code changed, each timed against its former form in ONE process.

On a shared 2-core machine the CPU seconds of two separate processes differ by 10-30 % with the
other jobs' load, more than the changes measured here. So each change is switched on and off in
the same process and the two forms ALTERNATE (on/off, off/on, ...), ``--rounds`` times:

* ``train step``: one training step of the `standard` profile's resolved config (48x48 crops,
  batch 4) with Adam's multi-tensor update (``foreach``, this code) against its per-parameter loop
  (the former default on a CPU); the weights they train are the same bit for bit
  (``tests/test_engine_train.py``).
* ``sample``: one ``method.sample`` call of a batch of 8 whole-slice windows (96x112, the
  profile's evaluation steps) with the fused convolution pairs' composed weights kept between
  calls (this code) against composing them at every call; the outputs are compared here too.

Usage::

    python benchmarks/bench_run_parts.py --runs mmdm-full pix2pix --rounds 4

Results: ``benchmarks/results/cpu/run-parts.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"mmdm-full": ("mmdm", "full"), "pix2pix": ("pix2pix", None)}


def _config(run: str):
    from mmdm.config import replace
    from mmdm.study.api import make_spec, train_config
    from mmdm.study.profiles import get_profile

    profile = get_profile("standard")
    spec = make_spec(*RUNS[run], None, profile)
    return profile, replace(train_config(spec, profile, seed=0, device="cpu"), {"val_every": 0, "image_every": 0})


def alternate(forms: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each form per round, the forms' order reversed every other round."""
    names = list(forms)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            c = time.process_time()
            forms[n]()
            out[n].append(time.process_time() - c)
    return out


def bench_train_step(run: str, steps: int, rounds: int) -> dict[str, Any]:
    from mmdm.engine.train import Trainer

    _, cfg = _config(run)
    tr = Trainer(cfg, Path(tempfile.mkdtemp(prefix="mmdm-parts-")) / "run", progress=False)
    batches = tr.batches(0)
    for _ in range(2):  # warm-up
        tr.train_step(next(batches))

    def steps_with(foreach: bool) -> Callable[[], None]:
        def go() -> None:
            for o in tr.optimizers.values():
                for g in o.param_groups:
                    g["foreach"] = foreach
            for _ in range(steps):
                tr.train_step(next(batches))
        return go

    times = alternate({"new": steps_with(True), "old": steps_with(False)}, rounds)
    return {"part": "train step", "unit": f"{steps} steps", "cpu_s": times,
            "params": sum(1 for _ in tr.method.parameters())}


def bench_sample(run: str, calls: int, rounds: int) -> dict[str, Any]:
    import torch

    import mmdm.nets.resunet as resunet
    from mmdm.engine.spec import build_method_from_config

    profile, cfg = _config(run)
    method = build_method_from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    src = {m: torch.rand(8, method.window, 96, 112, generator=g) * 2 - 1 for m in method.sources}
    real = resunet._composed

    @contextlib.contextmanager
    def composing_every_call(on: bool) -> Iterator[None]:
        if on:
            resunet._composed = lambda pairs, h, w: resunet._compose(pairs, h, w)
        try:
            yield
        finally:
            resunet._composed = real

    outs: dict[str, Any] = {}

    def calls_with(old: bool) -> Callable[[], None]:
        def go() -> None:
            with composing_every_call(old), torch.no_grad():
                for _ in range(calls):
                    outs["old" if old else "new"] = method.sample(
                        src, steps=profile.eval_sample_steps, generator=torch.Generator().manual_seed(1))
        return go

    calls_with(False)()  # warm-up
    times = alternate({"new": calls_with(False), "old": calls_with(True)}, rounds)
    return {"part": "sample", "unit": f"{calls} call(s) of 8 windows x {profile.eval_sample_steps} steps",
            "cpu_s": times, "identical_output": bool(torch.equal(outs["new"], outs["old"]))}


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# The changed parts of a `standard` run, this code ({m['git'].get('commit', '?')[:7]}) against "
             "their former form, in one process", "",
             f"CPU {m['device_name']}, capability {m['cpu_capability']}, 1 thread, torch {m['torch']}; load average "
             f"at start {m['load_average_start']}, at end {res['load_average_end']}. CPU seconds "
             "(`time.process_time`), the two forms alternating in one process, "
             f"{res['rounds']} rounds; medians. Generated by `benchmarks/bench_run_parts.py`.", "",
             "| run | part | unit | CPU s former | CPU s now | now / former | same result |", "|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        old, new = statistics.median(r["cpu_s"]["old"]), statistics.median(r["cpu_s"]["new"])
        same = r.get("identical_output", "bit for bit (tested)")
        lines.append(f"| {r['run']} | {r['part']} | {r['unit']} | {old:.3f} | {new:.3f} | {new / old:.3f} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["mmdm-full", "pix2pix"], choices=sorted(RUNS))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    p.add_argument("--calls", type=int, default=1, help="sample calls per timed block")
    p.add_argument("--out")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import os

    import torch

    from benchmarks.cpu_env import machine
    from mmdm.io import write_json, write_text

    torch.set_num_threads(1)
    res: dict[str, Any] = {"machine": machine(), "rounds": args.rounds, "results": []}
    for run in args.runs:
        res["results"].append({"run": run, **bench_train_step(run, args.steps, args.rounds)})
        print(json.dumps(res["results"][-1]), flush=True)
        if run == "mmdm-full":  # Pix2Pix has no fused convolution pairs
            res["results"].append({"run": run, **bench_sample(run, args.calls, args.rounds)})
            print(json.dumps(res["results"][-1]), flush=True)
    res["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out or ROOT / "benchmarks" / "results" / "cpu" / "run-parts.json")
    write_json(out, res)
    write_text(out.with_suffix(".md"), markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
