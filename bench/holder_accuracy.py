"""How often busy_retry names the right holder: precision and recall against the ground truth.

    python bench/holder_accuracy.py [--seeds 1-5] [--scenario NAME]... [--set KEY=VALUE]...

Which call held the resource behind an OPERAND_BUSY is not in any host trace: busy_retry
infers it from the contention matrix (tdx-reference §6.2) and the calls running at the BUSY
call's start (``plugins/_busy_holders.py``). The emulator writes the module's answer as a
truth row (T_LOCK_HOLDER, right after the call's first row: arg1 = the holder's leaf). Each
truth row is matched with the latest BUSY call of its corr that started before it, and the
inferred holder leaf is compared with the true one:

* precision = right / named (of the BUSYs busy_retry names a holder for, how many are right);
* recall = right / with a true holder (of the BUSYs that had one, how many it named rightly);
* no holder / named anyway: the BUSYs with no truth row (injected by ``faults.spurious_busy_*``:
  no call held anything) and how many of them busy_retry still put on some call.

Built-in scenarios only, recorded into a temporary folder; nothing is asserted (the figures go
to the README). PREVIOUS_TLB_EPOCH_BUSY has no truth row and is left out.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from tdxtrace.codes import Status
from tdxtrace.events import Kind
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import builtin_names, load_scenario
from tdxtrace.trace import open_trace
from tdxtrace_plugins._busy_holders import attribute_holders
from tdxtrace_plugins.busy_retry import calls, guest_accepts

BUSY_CLASS = int(Status.OPERAND_BUSY)
CLASS_MASK = 0xFFFFFFFF00000000


def holder_counts(path: Path) -> dict[str, int]:
    """BUSY calls, those busy_retry names a holder for, those with a true holder, right ones."""
    trace = open_trace(path)
    observable = trace.observable()
    all_calls = calls(trace, observable)
    accepts = guest_accepts(observable.filter(pl.col("kind") == Kind.GUEST_ACCEPT)).collect()
    inferred = attribute_holders(all_calls, accepts).filter(
        (pl.col("status") & CLASS_MASK) == BUSY_CLASS)
    truth = pl.read_ipc(path, columns=["seq", "kind", "corr", "arg1"]).filter(
        pl.col("kind") == int(Kind.T_LOCK_HOLDER)).select(
        pl.col("corr").fill_null(-1), "seq", pl.col("arg1").cast(pl.Int64).alias("true_leaf"))
    # A truth row follows its call's first row (the SEAMCALL row, or a VP.ENTER's TD_ENTRY):
    # it belongs to the latest BUSY call of its corr that started before it. An injected BUSY
    # has no truth row and takes none (matching by rank within the corr let one shift the
    # rest of its corr onto the wrong rows).
    busy = inferred.with_columns(pl.col("corr").fill_null(-1)).sort("start_seq")
    owners = truth.sort("seq").join_asof(
        busy.select("corr", "start_seq"), left_on="seq", right_on="start_seq", by="corr",
        strategy="backward", check_sortedness=False)
    pairs = busy.join(owners.select("start_seq", "true_leaf"), on="start_seq", how="left")
    if pairs.height != busy.height:  # two truth rows on one call: the pairing is broken
        raise SystemExit(f"{path}: {pairs.height - busy.height} BUSY calls met two truth rows")
    right = pairs.filter(pl.col("holder_leaf") == pl.col("true_leaf")).height
    unowned = pairs.filter(pl.col("true_leaf").is_null())
    return {"busy": pairs.height, "named": pairs["holder_leaf"].drop_nulls().len(),
            "true": pairs["true_leaf"].drop_nulls().len(), "right": right,
            "unowned": unowned.height, "unowned_named": unowned["holder_leaf"].drop_nulls().len()}


KEYS = ("busy", "named", "true", "right", "unowned", "unowned_named")


def _row(name: str, sums: dict[str, int]) -> str:
    return (f"{name:16} {sums['busy']:6} {sums['named']:6} {sums['true']:6} {sums['right']:6} "
            f"{_ratio(sums['right'], sums['named']):>9} {_ratio(sums['right'], sums['true']):>7} "
            f"{sums['unowned']:9} {sums['unowned_named']:12}")


def _ratio(num: int, den: int) -> str:
    return f"{num / den:.3f}" if den else "-"


def _seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1-5", help="a seed or a range, e.g. 1-5")
    parser.add_argument("--scenario", action="append", default=[],
                        help="a built-in scenario (repeatable; default: all)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="a scenario override, as for tdxtrace record (repeatable)")
    args = parser.parse_args(argv)
    names = args.scenario or list(builtin_names())
    print(f"{'scenario':16} {'BUSY':>6} {'named':>6} {'true':>6} {'right':>6} "
          f"{'precision':>9} {'recall':>7} {'no holder':>9} {'named anyway':>12}")
    total = dict.fromkeys(KEYS, 0)
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            sums = dict.fromkeys(KEYS, 0)
            for seed in _seeds(args.seeds):
                path = Path(folder) / f"{name}-{seed}.arrow"
                record(load_scenario(name, args.overrides), seed, path, force=True)
                for key, value in holder_counts(path).items():
                    sums[key] += value
                path.unlink()
            for key, value in sums.items():
                total[key] += value
            print(_row(name, sums))
    print(_row("all", total))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
