"""faults.spurious_busy_leaf reaches every call KVM makes of the leaf, not only Kvm.seamcall.

TDH.VP.ENTER (the run loop and the vCPU racing teardown) gets BUSY|TD_EPOCH and KVM's fastpath
handles it (tdx-reference.md §4(b): a TD exit with exit reason -1, re-entry). Batched teardown
rows stand for many calls: each may be hit, drawn in call order, and the hit call is written as
a row of its own with KVM's answer (kick and retry, or TDX_BUG_ON); the batch goes on after it.
"""

from __future__ import annotations

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import EXIT_REASON_INVALID, Leaf, OperandId, Status, with_operand
from tdxtrace.errors import ScenarioError
from tdxtrace.events import Flow, KickReason, Kind, Phase
from tdxtrace.sim.costs import CALLED_LEAVES, cost_key
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.busy_retry import BusyRetry

BUSY_CLASS = int(Status.OPERAND_BUSY) >> 32
BUSY_EPOCH = with_operand(int(Status.OPERAND_BUSY), OperandId.TD_EPOCH)
VP_ENTER_BUSY = ("faults.spurious_busy_leaf='vp.enter'", "faults.spurious_busy_p=0.2")
RACE = ("td.memory_mb=8", "faults.vcpu_load_during_teardown_p=1.0")


def _observable(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter(~pl.col("truth")).sort("seq")


def _busy(rows: pl.DataFrame) -> pl.Expr:
    return pl.col("status").floordiv(1 << 32) == BUSY_CLASS


def _calls(rows: pl.DataFrame, leaf: Leaf) -> pl.DataFrame:
    return rows.filter((pl.col("kind") == Kind.SEAMCALL) & (pl.col("leaf") == leaf))


def _pages(calls: pl.DataFrame) -> int:
    return int(calls["arg1"].fill_null(1).sum())


def _busy_enters(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.filter((pl.col("kind") == Kind.TD_EXIT) & _busy(rows))


def test_vp_enter_gets_the_injected_busy_and_kvm_re_enters_through_the_fastpath() -> None:
    events, truth = run("zap-under-load", "run.duration_us=5000", *VP_ENTER_BUSY, seed=3)
    rows = _observable(events)
    busy = _busy_enters(rows)
    entries = rows.filter(pl.col("kind") == Kind.TD_ENTRY).height
    # Real BUSY VP.ENTERs (racing TRACK) are rare here: the injected ones are ~20 %.
    assert 0.15 < busy.height / entries < 0.25
    assert set(busy["status"].to_list()) == {BUSY_EPOCH}
    assert set(busy["exit_reason"].to_list()) == {EXIT_REASON_INVALID}
    assert truth["busy_by_leaf_operand"]["TDH.VP.ENTER|TD_EPOCH"] == busy.height
    # The fastpath: the vCPU's next row is its next TD_ENTRY, in the same chain (corr).
    per_vcpu = rows.filter(pl.col("vcpu").is_not_null() & (pl.col("flow") == Flow.RUN))
    following = per_vcpu.with_columns(
        next_kind=pl.col("kind").shift(-1).over("vcpu"),
        next_corr=pl.col("corr").shift(-1).over("vcpu"),
    ).join(busy.select("seq"), on="seq").filter(pl.col("next_kind").is_not_null())
    assert following.height >= busy.height - 8  # at most the last exit of each vCPU
    assert (following["next_kind"] == Kind.TD_ENTRY).all()
    assert (following["next_corr"] == following["corr"]).all()
    assert truth.get("vms_bugged", 0) == 0  # KVM never bugs the VM for a BUSY VP.ENTER
    result = run_analyzer(BusyRetry(), make_trace(events.to_dicts()))
    assert result.metrics["busy_total"] == truth["busy_total"]


def test_the_vcpu_racing_teardown_gets_it_too_and_cannot_stall_the_teardown() -> None:
    events, truth = run("teardown", *RACE, "faults.spurious_busy_leaf='vp.enter'",
                        "faults.spurious_busy_p=1.0")
    rows = _observable(events)
    release = rows.filter((pl.col("kind") == Kind.PHASE) & (pl.col("sub") == Phase.RELEASE_HKID))
    racing = _busy_enters(rows.filter(pl.col("seq") > release["seq"].min()))
    assert racing.height > 2  # the racing thread re-entered after its BUSY exits
    assert racing["corr"].n_unique() == 2  # one chain per TD's racing vCPU
    # It never got in, so it never became associated again: VPFLUSHDONE works first time.
    done = _calls(rows, Leaf.TDH_MNG_VPFLUSHDONE)
    assert done["status"].to_list() == [0, 0]
    assert truth["teardowns_finished"] == 2


def test_batched_zap_calls_get_injected_busy_and_kvms_kick_and_retry() -> None:
    events, truth = run("teardown", "td.memory_mb=16",
                        "faults.spurious_busy_leaf='mem.page.remove'",
                        "faults.spurious_busy_p=0.05")
    rows = _observable(events)
    remove = _calls(rows, Leaf.TDH_MEM_PAGE_REMOVE)
    busy = remove.filter(_busy(remove))
    calls = _pages(remove)
    assert 0.03 < busy.height / calls < 0.07
    # Batched rows stand for calls that succeeded; the BUSY ones have rows of their own, most
    # of them among the batched pages (past the first teardown.row_pages of each TD).
    assert busy["arg1"].is_null().all()
    assert remove.filter(pl.col("arg1").is_not_null())["status"].eq(0).all()
    for td in (0, 1):
        of_td = remove.filter(pl.col("td") == td)
        first_batched = of_td.filter(pl.col("arg1").is_not_null())["gpa"].min()
        assert busy.filter((pl.col("td") == td) & (pl.col("gpa") > first_batched)).height > 50
    # tdh_do_no_vcpus(): a BUSY is followed by the kick and one retry on the same page; a
    # retry that is BUSY again is TDX_BUG_ON (VM_BUGGED the first time).
    retry_kick = (pl.col("kind") == Kind.KICK) & (pl.col("sub") == KickReason.NO_VCPUS_RETRY)
    around = rows.filter(pl.col("flow") == Flow.TEARDOWN).with_columns(
        after_kick=retry_kick.shift(1).over("td"), next_kick=retry_kick.shift(-1).over("td"),
        l2=pl.col("leaf").shift(-2).over("td"), g2=pl.col("gpa").shift(-2).over("td"),
    ).join(busy.select("seq"), on="seq")
    first = around.filter(~pl.col("after_kick"))
    retried_busy = around.height - first.height
    assert first["next_kick"].all()
    assert (first["l2"] == Leaf.TDH_MEM_PAGE_REMOVE).all() and (first["g2"] == first["gpa"]).all()
    assert retried_busy > 0 and truth["vms_bugged"] == 2
    # Every page is accounted for: removed, or leaked after a second BUSY (which also leaves
    # the TDR to its TD: its RECLAIM fails).
    removed = _pages(remove.filter(pl.col("status") == 0))
    tdr_leaks = _calls(rows, Leaf.TDH_PHYMEM_PAGE_RECLAIM).filter(
        pl.col("status") == int(Status.TD_ASSOCIATED_PAGES_EXIST)).height
    assert removed + truth.get("teardown_pages_leaked", 0) - tdr_leaks == 2 * 4096
    assert truth["busy_total"] == busy.height
    result = run_analyzer(BusyRetry(), make_trace(events.to_dicts()))
    assert result.metrics["busy_total"] == truth["busy_total"]


def test_batched_reclaims_get_injected_busy_and_the_teardown_goes_on() -> None:
    events, truth = run("teardown", "td.memory_mb=8", "policy.hkid_release='early'",
                        "faults.spurious_busy_leaf='phymem.page.reclaim'",
                        "faults.spurious_busy_p=0.05")
    rows = _observable(events)
    reclaim = _calls(rows, Leaf.TDH_PHYMEM_PAGE_RECLAIM)
    failed = reclaim.filter(pl.col("status") != 0)
    assert failed["arg1"].is_null().all()
    assert reclaim.filter(pl.col("arg1").is_not_null())["status"].eq(0).all()
    phase = pl.col("sub") == Phase.PRIVATE_PAGES
    for td in (0, 1):
        of_td = rows.filter(pl.col("td") == td)
        start = of_td.filter((pl.col("kind") == Kind.PHASE) & phase)["seq"].item()
        end = of_td.filter((pl.col("kind") == Kind.PHASE_DONE) & phase)["seq"].item()
        inside = reclaim.filter((pl.col("td") == td) & pl.col("seq").is_between(start, end))
        assert _pages(inside) == 2048  # every page tried once: KVM does not retry a RECLAIM
        assert inside.filter(pl.col("status") != 0).height > 50
    # A failed RECLAIM leaks its page; the TD keeps its TDR then, and that RECLAIM fails too.
    assert truth["teardown_pages_leaked"] == failed.height
    assert truth["teardowns_finished"] == 2 and truth.get("hkid_leaks", 0) == 0


def test_a_batched_page_draws_as_if_it_had_its_own_row() -> None:
    # One TD: the calls of the leaf come in one order, so the pages that get BUSY are the same
    # whether every call has its own row or all but the retries are batched.
    def busy_pages(row_pages: int) -> list[int]:
        events, _ = run("teardown", "td.count=1", "td.memory_mb=8",
                        f"teardown.row_pages={row_pages}",
                        "faults.spurious_busy_leaf='mem.range.block'",
                        "faults.spurious_busy_p=0.05")
        block = _calls(_observable(events), Leaf.TDH_MEM_RANGE_BLOCK)
        return block.filter(_busy(block))["gpa"].to_list()

    batched = busy_pages(0)
    assert len(batched) > 50
    assert batched == busy_pages(1 << 20)


def test_a_busy_finalize_is_ebusy_to_the_vmm_which_exits_without_a_kvm_bug() -> None:
    # tdx_td_finalize(): OPERAND_BUSY from TDH.MR.FINALIZE returns -EBUSY (tdx-reference.md
    # §4(a) step 7), no KVM_BUG_ON; QEMU gives up on the VM, so the TD never runs and is torn
    # down like any other.
    events, truth = run("zero-step", "faults.spurious_busy_leaf='mr.finalize'",
                        "faults.spurious_busy_p=1.0")
    rows = _observable(events)
    finalize = _calls(rows, Leaf.TDH_MR_FINALIZE)
    assert finalize.height == 1 and finalize.select(_busy(finalize)).item()
    assert truth["vms_bugged"] == 0 and truth["vmm_exits_on_finalize"] == 1
    assert rows.filter(pl.col("kind").is_in([Kind.VM_BUGGED, Kind.TD_ENTRY])).height == 0
    assert _calls(rows, Leaf.TDH_MEM_PAGE_AUG).height == 0  # nothing ran in it
    assert truth["teardowns_finished"] == 1 and truth["hkid_leaks"] == 0
    done = rows.filter((pl.col("kind") == Kind.PHASE_DONE) & (pl.col("sub") == Phase.FINALIZE))
    assert done["status"].to_list() == finalize["status"].to_list()  # the ioctl's answer


@pytest.mark.parametrize("leaf", CALLED_LEAVES, ids=cost_key)
def test_every_leaf_offered_for_injection_draws_it(leaf: Leaf) -> None:
    # faults.spurious_busy_leaf offers only leaves the emulator calls: each gets its BUSY.
    _, truth = run("zap-under-load", "run.duration_us=3000",
                   f"faults.spurious_busy_leaf='{cost_key(leaf)}'", "faults.spurious_busy_p=1.0")
    name = leaf.name.removeprefix("TDH_").replace("_", ".")
    assert any(k.startswith(f"TDH.{name}|") for k in truth["busy_by_leaf_operand"]), truth


@pytest.mark.parametrize("spelled", ["mem.page.add", "TDH.SYS.INIT"])
def test_a_leaf_the_emulator_never_calls_is_refused_as_spelled(spelled: str) -> None:
    with pytest.raises(ScenarioError, match=f"faults.spurious_busy_leaf: '{spelled}' is not "
                                            "allowed"):
        load_scenario("zero-step", [f"faults.spurious_busy_leaf='{spelled}'"])
