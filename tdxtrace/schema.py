"""Trace format v1: the one event table, field by field.

The schema is code first; ``schemas/`` holds exports of it for readers in other languages
(``tdxtrace schema --export schemas/`` rewrites them, and a test fails when they drift).

Every row is one event. Rows are totally ordered by ``seq`` (0, 1, 2, ... with no gaps) and
``ts_ns`` never decreases along ``seq``: a SEAMCALL row is written when the call *starts*, with
the duration it will take already in ``dur_ns``. Times are integer nanoseconds since the run
began, never floats, never wall-clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

FORMAT_NAME = "tdxtrace"
SCHEMA_VERSION = 1

# Keys of the schema's custom metadata (all values are UTF-8 text; JSON where noted).
META_FORMAT = "tdxtrace.format"  # always FORMAT_NAME
META_SCHEMA_VERSION = "tdxtrace.schema_version"  # decimal integer
META_VERSION = "tdxtrace.version"  # version of the tdxtrace that wrote the file
META_PRODUCER = "tdxtrace.producer"  # "emulator", or the name of an importer
META_SCENARIO_NAME = "tdxtrace.scenario_name"  # e.g. "fault-storm"; empty for imports
META_SCENARIO = "tdxtrace.scenario"  # canonical scenario text (JSON); empty for imports
META_SEED = "tdxtrace.seed"  # decimal integer; empty for imports
META_POLICIES = "tdxtrace.policies"  # JSON object: policy name -> chosen alternative

# Keys of the summary written when a trace is finished (see tdxtrace.trace.writer).
SUMMARY_EVENTS = "tdxtrace.summary.events"  # decimal integer
SUMMARY_DIGEST = "tdxtrace.summary.digest"  # "sha256:<hex>" over the logical content
SUMMARY_TRUTH = "tdxtrace.summary.truth"  # JSON object of ground-truth counters


@dataclass(frozen=True)
class Field:
    """One column: its Arrow type, whether it may be null, its unit and what it means."""

    name: str
    type: pa.DataType
    nullable: bool
    unit: str
    doc: str


FIELDS: tuple[Field, ...] = (
    Field("seq", pa.int64(), False, "count",
          "Position of the event in the trace: 0, 1, 2, ... without gaps; the total order."),
    Field("ts_ns", pa.int64(), False, "ns",
          "When the event happened (SEAMCALL: when the call started), ns since the run began. "
          "Never decreases along seq."),
    Field("dur_ns", pa.int64(), False, "ns",
          "How long the event took: a SEAMCALL's execution time, an IPI's delivery, a phase "
          "(on PHASE_DONE: the phase's length). 0 for instantaneous events."),
    Field("kind", pa.uint8(), False, "enum Kind",
          "What the row is (tdxtrace.events.Kind). Below 100: observable; 100 and up: truth."),
    Field("truth", pa.bool_(), False, "flag",
          "True for emulator-internal ground-truth rows, which analyzers must not read."),
    Field("flow", pa.uint8(), False, "enum Flow",
          "The KVM operation the row belongs to (tdxtrace.events.Flow); 0 when none."),
    Field("sub", pa.uint16(), False, "enum, per kind",
          "A kind-specific sub-code (retry cause, fault outcome, zap reason, phase, ...); "
          "0 when the kind has none. The schema's sub-codes section (`tdxtrace schema`) names "
          "them (tdxtrace.events.SUB_ENUMS)."),
    Field("corr", pa.int64(), True, "id",
          "Correlation id: every row of one KVM operation (a fault with its retries, a zap, a "
          "teardown, a MapGPA conversion, a chain of BUSY-retried VP.ENTERs) shares it. "
          "Null for rows outside any operation."),
    Field("td", pa.int32(), True, "index",
          "The TD (0, 1, ... in creation order). Null for host-wide events."),
    Field("vcpu", pa.int32(), True, "index",
          "The vCPU index within its TD; null when the row is not about one vCPU."),
    Field("lp", pa.int32(), True, "index",
          "The logical processor the event ran on (for IPI: the target LP)."),
    Field("leaf", pa.uint16(), True, "SEAMCALL leaf",
          "SEAMCALL leaf number (tdxtrace.codes.Leaf), bits 15:0 of RAX without the version. "
          "SEAMCALL, TD_ENTRY/TD_EXIT (0 = TDH.VP.ENTER), VM_BUGGED."),
    Field("status", pa.uint64(), True, "TDX status / TDVMCALL status / errno",
          "SEAMCALL and TD_EXIT: the 64-bit RAX (class in bits 63:32, operand ID or exit "
          "reason in 31:0). TDVMCALL_DONE: R10. USERSPACE_RETURN: hypercall.ret. "
          "GUEST_ACCEPT: the TDCALL status. VM_BUGGED: the offending status."),
    Field("exit_reason", pa.uint32(), True, "VMX exit reason",
          "TD_EXIT: the exit reason KVM saw (0xFFFFFFFF when VP.ENTER did not succeed, as "
          "kvm_exit reports it)."),
    Field("gpa", pa.uint64(), True, "guest physical address",
          "The GPA the event is about (fault address, SEAMCALL GPA operand without the level "
          "bits, MapGPA start, zap start). Includes the shared bit when the GPA is shared."),
    Field("level", pa.uint8(), True, "TDX S-EPT level",
          "0 = 4K, 1 = 2M, 2 = 1G (the TDX encoding, PG_LEVEL - 1)."),
    Field("rip", pa.uint64(), True, "guest linear address",
          "Guest RIP (TD_ENTRY, TD_EXIT, PAGE_FAULT, truth zero-step rows)."),
    Field("arg0", pa.uint64(), True, "per kind",
          "First kind-specific argument (see the table of kinds: `tdxtrace schema`, "
          "schemas/trace-v1.txt)."),
    Field("arg1", pa.uint64(), True, "per kind", "Second kind-specific argument."),
    Field("arg2", pa.uint64(), True, "per kind", "Third kind-specific argument."),
)

COLUMN_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)

# What arg0..arg2 (and sub) mean for each kind; part of the format's documentation.
KIND_ARGS: dict[str, str] = {
    "SEAMCALL": "leaf, status, dur_ns, lp, td, vcpu (VP.* leaves), gpa+level (MEM.* leaves); "
                "arg0 = RCX input when it is not a GPA (CACHE.WB resume flag, reclaimed page "
                "number, MNG.CREATE HKID); arg1 = the pages a batched row stands for (teardown "
                "BLOCK, TRACK, REMOVE, WBINVD and RECLAIM beyond teardown.row_pages per phase; "
                "dur_ns is their sum)",
    "TD_ENTRY": "td, vcpu, lp, rip; leaf = 0",
    "TD_EXIT": "td, vcpu, lp, status (RAX), exit_reason, gpa (R8), rip, arg0 = exit "
               "qualification of an EPT violation (kvm_exit's info1: 0x182 a guest write as "
               "hardware reports it, 0x2 the module's zero-step exit, which sets write access "
               "alone, 0 one the guest's ACCEPT caused; null on other exits), "
               "arg1 = extended exit qualification (kvm_exit's info2; type in bits 3:0, 1 = "
               "the guest's TDG.MEM.PAGE.ACCEPT caused the EPT violation; null when none)",
    "PAGE_FAULT": "td, vcpu, gpa, rip, arg0 = the exit qualification KVM uses (forced to "
                  "write, 0x2, on a private GPA; the exit's own on a shared one)",
    "FAULT_RETRY": "sub = RetryCause, gpa, level, leaf + status when a SEAMCALL was BUSY",
    "FAULT_DONE": "sub = FaultOutcome, gpa, arg0 = local retries in this invocation (turns "
                  "of KVM's loop: a spin on an invalidation in progress is one FAULT_RETRY)",
    "SPTE_CHANGED": "sub = RootKind, gpa, level, arg0 = old SPTE, arg1 = new SPTE, "
                    "arg2 = root id",
    "KICK": "sub = KickReason, td, arg0 = vCPUs that were in guest mode",
    "IPI": "sub = IpiPurpose, lp = target, arg0 = source lp",
    "TDVMCALL": "td, vcpu, arg0 = sub-function (R11), gpa = R12, arg1 = R13",
    "TDVMCALL_DONE": "status = R10, arg0 = R11 returned, arg1 = sub-function",
    "USERSPACE_EXIT": "exit_reason = run->exit_reason: 3 KVM_EXIT_HYPERCALL (MapGPA: gpa = "
                      "args[0], arg0 = pages (args[1]), arg1 = attributes (args[2])) or 39 "
                      "KVM_EXIT_MEMORY_FAULT (gpa, arg0 = pages, arg1 = flags, 8 = private)",
    "USERSPACE_RETURN": "status = run->hypercall.ret (0 or a positive errno); 0 after a "
                        "memory fault",
    "MEM_ATTR": "gpa, arg0 = pages, arg1 = attributes (KVM_MEMORY_ATTRIBUTE_PRIVATE = 8)",
    "ZAP": "sub = ZapReason, gpa, arg0 = pages, arg1 = ZapScope",
    "ZAP_DONE": "sub = ZapReason, arg0 = SPTEs zapped, arg1 = private leaves zapped",
    "PHASE": "sub = Phase, td, arg0 = the amount of work (pages, vCPUs, packages)",
    "PHASE_DONE": "sub = Phase, td, dur_ns = phase length, status = the first failure in "
                  "the phase, 0 if none (KVM carries on past a leaked page or a bugged VM); "
                  "RELEASE_HKID: the status that leaked the HKID; TEARDOWN: the first "
                  "non-zero status of its phases",
    "VM_BUGGED": ("td, leaf, status of the SEAMCALL that made KVM_BUG_ON fire; both null "
                  "when no SEAMCALL did (the S-EPT teardown found the HKID still assigned)"),
    "VCPU_LOAD": "td, vcpu, lp = new LP, arg0 = previous LP (null if none); flow CREATE: "
                 "KVM_TDX_INIT_VCPU on the VMM's LP, where TDH.VP.INIT associates the vCPU",
    "GUEST_ACCEPT": "td, vcpu, gpa, level, status",
    "GUEST_MAPGPA": "sub = GuestMapGpa, td, vcpu, gpa = start, arg0 = end or R11, arg1 = "
                    "retries used",
    "ROOT": "sub = RootEvent, td, arg0 = RootKind, arg2 = root id",
    "T_ZERO_STEP_ARMED": "td, vcpu, rip, gpa, arg0 = faults counted at this RIP",
    "T_ZERO_STEP_RESET": "td, vcpu, rip: an armed vCPU exited at a RIP other than the one "
                         "it entered at, and was disarmed",
    "T_ZERO_STEP_GPA": "td, vcpu, rip, gpa: the module appended gpa to the vCPU's zero-step "
                       "list; arg0 = list length after appending",
    "T_LOCK_HOLDER": "sub = operand id, corr = the BUSY call's corr, arg0 = holder lp, "
                     "arg1 = holder leaf (0x10000 + TDCALL leaf for a guest call), "
                     "arg2 = holder corr",
    "T_SEPT_STATE": "reserved (sub = new SeptState, td, gpa, level, arg0 = old SeptState); "
                    "not written by this version",
    "T_PRIVATE_ZAP_UNEXPECTED": "td, gpa, sub = ZapReason",
    "T_SYNTHESIZED_EXIT": "td, vcpu, gpa: the module emulated an EPT-violation exit for a "
                          "zero-step-listed GPA without entering the guest",
}


def arrow_schema(metadata: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of trace format v1, optionally with custom metadata attached."""
    fields = [
        pa.field(f.name, f.type, nullable=f.nullable,
                 metadata={"unit": f.unit, "doc": f.doc})
        for f in FIELDS
    ]
    meta = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
    return pa.schema(fields, metadata=meta or None)


def schema_text() -> str:
    """A readable rendering of the schema, the same text ``tdxtrace schema`` prints."""
    lines = [f"# {FORMAT_NAME} trace format, schema version {SCHEMA_VERSION}", "",
             "## Columns", ""]
    for f in FIELDS:
        null = "nullable" if f.nullable else "not null"
        lines.append(f"{f.name}: {f.type} ({null}; {f.unit})")
        lines.append(f"    {f.doc}")
    lines += ["", "## Kinds (column kind) and what their columns carry", ""]
    from tdxtrace.events import Kind  # local: keeps this module importable on its own

    for kind in Kind:
        lines.append(f"{int(kind):3d} {kind.name}: {KIND_ARGS[kind.name]}")
    lines += ["", "## Sub-codes (column sub) of the kinds that have them", ""]
    for kind_name, codes in sub_codes().items():
        named = ", ".join(f"{value} {name}" for value, name in codes.items())
        lines.append(f"{kind_name}: {named}")
    lines += ["", "## Run metadata keys (schema custom metadata)", ""]
    for key in (META_FORMAT, META_SCHEMA_VERSION, META_VERSION, META_PRODUCER,
                META_SCENARIO_NAME, META_SCENARIO, META_SEED, META_POLICIES):
        lines.append(key)
    lines += ["", "## Summary keys (custom metadata of the final, empty record batch)", ""]
    lines += [SUMMARY_EVENTS, SUMMARY_DIGEST, SUMMARY_TRUTH]
    return "\n".join(lines) + "\n"


def sub_codes() -> dict[str, dict[int, str]]:
    """Per kind with sub-codes, each code's name (tdxtrace.events.SUB_ENUMS), in kind order."""
    from tdxtrace.events import SUB_ENUMS, Kind  # local, as in schema_text()

    return {kind.name: {int(m): m.name for m in SUB_ENUMS[kind]}
            for kind in Kind if kind in SUB_ENUMS}
