"""The TDX vocabulary's values: SEAMCALL leaves, status codes, operand IDs, exit reasons,
TDVMCALLs and the constants KVM and the module use, each with its source tag.

Every value is the real one, copied from ``docs/tdx-reference.md`` (tags in brackets name the
source listed there: [VIRT-H] kernel ``tdx.h`` leaf numbers, [MOD] Intel's TDX module 1.5.01,
[ERRNO] the kernel's ``tdx_errno.h``, [ASM-TDX] kernel SW-defined codes, [KVM-new] ``tdx.c``).
"""

from __future__ import annotations

from enum import IntEnum, unique

from tdxtrace.errors import TdxtraceError

STATUS_MASK = 0xFFFFFFFF00000000  # kernel TDX_SEAMCALL_STATUS_MASK [ERRNO]: the class half
OPERAND_MASK = 0xFFFFFFFF  # operand ID / details_L2 / VMX exit reason [MOD api_error_code_t]
TDX_ERROR = 1 << 63  # bit 63 "error" [ERRNO]
TDX_NON_RECOVERABLE = 1 << 62  # bit 62 "non_recoverable" [ERRNO]
TDX_VERSION_SHIFT = 16  # leaf version in RAX bits 23:16 [VIRT-H]
TDX_EXTENDMR_CHUNKSIZE = 256  # bytes per TDH.MR.EXTEND; 16 calls per 4K page [KVM-new]
RDRAND_RETRY_LOOPS = 10  # sc_retry() budget for TDX_RND_NO_ENTROPY [SC-INT]


class UnknownCodeError(TdxtraceError, ValueError):
    """Text that names no TDX code; a ValueError, and printed by the CLI as one line."""


@unique
class Leaf(IntEnum):
    """SEAMCALL leaf numbers: kernel ``tdx.h`` [VIRT-H], module ``seamcall_leaf_opcode_t`` [MOD].

    The export/import migration leaves (64-75, 80-87) are not modelled and left out.
    """

    TDH_VP_ENTER = 0
    TDH_MNG_ADDCX = 1
    TDH_MEM_PAGE_ADD = 2
    TDH_MEM_SEPT_ADD = 3
    TDH_VP_ADDCX = 4
    TDH_MEM_PAGE_RELOCATE = 5
    TDH_MEM_PAGE_AUG = 6
    TDH_MEM_RANGE_BLOCK = 7
    TDH_MNG_KEY_CONFIG = 8
    TDH_MNG_CREATE = 9
    TDH_VP_CREATE = 10
    TDH_MNG_RD = 11
    TDH_MEM_RD = 12
    TDH_MNG_WR = 13
    TDH_MEM_WR = 14
    TDH_MEM_PAGE_DEMOTE = 15
    TDH_MR_EXTEND = 16
    TDH_MR_FINALIZE = 17
    TDH_VP_FLUSH = 18
    TDH_MNG_VPFLUSHDONE = 19
    TDH_MNG_KEY_FREEID = 20
    TDH_MNG_INIT = 21
    TDH_VP_INIT = 22
    TDH_MEM_PAGE_PROMOTE = 23
    TDH_PHYMEM_PAGE_RDMD = 24
    TDH_MEM_SEPT_RD = 25
    TDH_VP_RD = 26
    TDH_MNG_KEY_RECLAIMID = 27
    TDH_PHYMEM_PAGE_RECLAIM = 28
    TDH_MEM_PAGE_REMOVE = 29
    TDH_MEM_SEPT_REMOVE = 30
    TDH_SYS_KEY_CONFIG = 31
    TDH_SYS_INFO = 32
    TDH_SYS_INIT = 33
    TDH_SYS_RD = 34
    TDH_SYS_LP_INIT = 35
    TDH_SYS_TDMR_INIT = 36
    TDH_SYS_RDALL = 37
    TDH_MEM_TRACK = 38
    TDH_MEM_RANGE_UNBLOCK = 39
    TDH_PHYMEM_CACHE_WB = 40
    TDH_PHYMEM_PAGE_WBINVD = 41
    TDH_MEM_SEPT_WR = 42
    TDH_VP_WR = 43
    TDH_SYS_LP_SHUTDOWN = 44
    TDH_SYS_CONFIG = 45
    TDH_SERVTD_BIND = 48  # module-only [MOD]
    TDH_SERVTD_PREBIND = 49
    TDH_SYS_SHUTDOWN = 52
    TDH_SYS_UPDATE = 53
    TDH_PHYMEM_PAMT_ADD = 58  # Dynamic-PAMT series only, not mainline
    TDH_PHYMEM_PAMT_REMOVE = 59
    TDH_MIG_STREAM_CREATE = 96


@unique
class TdcallLeaf(IntEnum):
    """Guest TDCALL leaves, module ``tdcall_leaf_opcode_t`` [MOD]."""

    TDG_VP_VMCALL = 0
    TDG_VP_INFO = 1
    TDG_MR_RTMR_EXTEND = 2
    TDG_VP_VEINFO_GET = 3
    TDG_MR_REPORT = 4
    TDG_VP_CPUIDVE_SET = 5
    TDG_MEM_PAGE_ACCEPT = 6
    TDG_VM_RD = 7
    TDG_VM_WR = 8
    TDG_VP_RD = 9
    TDG_VP_WR = 10
    TDG_SYS_RD = 11
    TDG_SYS_RDALL = 12
    TDG_MEM_PAGE_ATTR_RD = 23
    TDG_MEM_PAGE_ATTR_WR = 24


@unique
class Status(IntEnum):
    """TDX status values (RAX), named without the ``TDX_`` prefix.

    Kernel SW codes from [ASM-TDX]; codes Linux uses from [ERRNO]; the rest from the module's
    generated table [MOD]. Most members are *classes* (low 32 bits zero) to which the module adds
    an operand ID; SW_ERROR's members SEAMCALL_GP/UD/VMFAILINVALID carry their own low bits.
    """

    SUCCESS = 0
    # Kernel SW-defined codes: no module involved (SEAMCALL faulted or VMfailInvalid).
    SW_ERROR = 0x8000FF0000000000
    SEAMCALL_VMFAILINVALID = 0x8000FF00FFFF0000
    SEAMCALL_GP = 0x8000FF000000000D
    SEAMCALL_UD = 0x8000FF0000000006
    # Used by Linux [ERRNO].
    NON_RECOVERABLE_VCPU = 0x4000000100000000
    NON_RECOVERABLE_TD = 0x4000000200000000
    NON_RECOVERABLE_TD_NON_ACCESSIBLE = 0x6000000500000000
    NON_RECOVERABLE_TD_WRONG_APIC_MODE = 0x6000000700000000
    INTERRUPTED_RESUMABLE = 0x8000000300000000
    OPERAND_INVALID = 0xC000010000000000
    OPERAND_BUSY = 0x8000020000000000
    PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
    SYS_BUSY = 0x8000020200000000
    RND_NO_ENTROPY = 0x8000020300000000
    PAGE_METADATA_INCORRECT = 0xC000030000000000
    VCPU_NOT_ASSOCIATED = 0x8000070200000000
    KEY_GENERATION_FAILED = 0x8000080000000000
    KEY_STATE_INCORRECT = 0xC000081100000000
    KEY_CONFIGURED = 0x0000081500000000
    NO_HKID_READY_TO_WBCACHE = 0x0000082100000000
    FLUSHVP_NOT_DONE = 0x8000082400000000
    EPT_WALK_FAILED = 0xC0000B0000000000
    EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
    METADATA_FIELD_NOT_READABLE = 0xC0000C0200000000
    # Module-only [MOD].
    INTERRUPTED_RESTARTABLE = 0x8000000400000000
    INVALID_RESUMPTION = 0xC000000600000000
    NON_RECOVERABLE_TD_CORRUPTED_MD = 0x6000000A00000000
    OPERAND_ADDR_RANGE_ERROR = 0xC000010100000000
    OPERAND_BUSY_HOST_PRIORITY = 0x8000020400000000
    HOST_PRIORITY_BUSY_TIMEOUT = 0x9000020500000000
    PAGE_ALREADY_FREE = 0x0000030100000000
    TD_ASSOCIATED_PAGES_EXIST = 0xC000040000000000
    LIFECYCLE_STATE_INCORRECT = 0xC000060700000000
    VCPU_STATE_INCORRECT = 0xC000070000000000
    VCPU_ASSOCIATED = 0x8000070100000000
    TSC_ROLLBACK = 0xC000070600000000
    TD_KEYS_NOT_CONFIGURED = 0x8000081000000000
    WBCACHE_NOT_COMPLETE = 0x8000081700000000
    WBCACHE_RESUME_ERROR = 0xC000082300000000
    EPT_ENTRY_FREE = 0xC0000B0100000000
    EPT_ENTRY_NOT_FREE = 0xC0000B0200000000
    GPA_RANGE_NOT_BLOCKED = 0xC0000B0600000000
    GPA_RANGE_ALREADY_BLOCKED = 0x00000B0700000000
    TLB_TRACKING_NOT_DONE = 0xC0000B0800000000
    PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
    GPA_RANGE_BLOCKED = 0xC0000B0C00000000


# The module 1.5.01 table [MOD] disagrees with the kernel header [ERRNO] on two codes (it sets
# the fatal bit 61, and bit 63 for WRONG_APIC_MODE). The enum keeps the kernel values because
# KVM's masked-equality checks are what the emulated KVM must recognise; these are the module's.
MODULE_NON_RECOVERABLE_TD = 0x6000000200000000
MODULE_NON_RECOVERABLE_TD_WRONG_APIC_MODE = 0xE000000700000000

# Statuses after which KVM keeps VP.ENTER's low 32 bits as the exit reason
# (tdx_to_vmx_exit_reason() [KVM-new]); any other class means exit reason -1u.
EXIT_REASON_STATUS_CLASSES = frozenset({
    Status.SUCCESS, Status.NON_RECOVERABLE_VCPU, Status.NON_RECOVERABLE_TD,
    Status.NON_RECOVERABLE_TD_NON_ACCESSIBLE, Status.NON_RECOVERABLE_TD_WRONG_APIC_MODE,
})


@unique
class OperandId(IntEnum):
    """Operand IDs in a status's low bits [MOD]: GPR numbers, then TD structures and locks."""

    RAX = 0
    RCX = 1  # also how an S-EPT *entry* lock conflict on the GPA operand is reported
    RDX = 2
    R8 = 8
    R9 = 9
    R10 = 10
    R11 = 11
    R12 = 12
    R13 = 13
    R14 = 14
    R15 = 15
    TDR = 0x80
    TDCX = 0x81
    TDVPR = 0x82
    TDCS = 0x90
    TDVPS = 0x91
    SEPT_TREE = 0x92  # kernel TDX_OPERAND_ID_SEPT
    SEPT_ENTRY = 0x93
    TD_EPOCH = 0xA9
    KOT = 0xBA
    WBCACHE = 0xBC


@unique
class ExitReason(IntEnum):
    """VMX basic exit reasons that matter for TDs (Linux ``uapi/asm/vmx.h``, reference §3.2)."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    OTHER_SMI = 6
    CPUID = 10
    HLT = 12
    VMCALL = 18
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    MCE_DURING_VMENTRY = 41
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    TDCALL = 77


EXIT_REASON_INVALID = 0xFFFFFFFF  # kvm_exit's reason when VP.ENTER did not succeed [KVM-new]


@unique
class TdvmcallLeaf(IntEnum):
    """TDVMCALL (GHCI) sub-functions in guest R11 [KVM-new, GUEST]."""

    GET_TD_VM_CALL_INFO = 0x10000
    MAP_GPA = 0x10001
    GET_QUOTE = 0x10002
    REPORT_FATAL_ERROR = 0x10003
    SETUP_EVENT_NOTIFY_INTERRUPT = 0x10004


@unique
class TdvmcallStatus(IntEnum):
    """TDVMCALL statuses the host returns in R10 [KVM-new]; GPA_INUSE is from the GHCI header."""

    SUCCESS = 0
    RETRY = 1
    INVALID_OPERAND = 0x8000000000000000
    GPA_INUSE = 0x8000000000000001
    ALIGN_ERROR = 0x8000000000000002
    SUBFUNC_UNSUPPORTED = 0x8000000000000003


# --- constants the emulator uses (reference §§1, 4, 5) ---------------------------------------
SHADOW_NONPRESENT_VALUE = 0x8000000000000000  # bit 63 "suppress #VE" [TDP spte.h]
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0  # 0x80000000000005A0 [TDP]
STEPPING_EPF_THRESHOLD = 6  # zero-step: EPT violations at one RIP before GPAs are listed [MOD]
EPF_GPA_LIST_SIZE = 32  # per-vCPU last_epf_gpa_list[] capacity [MOD]
TDX_SEAMCALL_RETRIES = 10000  # CACHE.WB resume budget per package [KVM-new]
TDX_MAP_GPA_MAX_LEN = 2 * 1024 * 1024  # MapGPA bytes per userspace exit [KVM-new]
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3  # Linux uapi/linux/kvm.h
KVM_EXIT_HYPERCALL = 3  # run->exit_reason values, Linux uapi/linux/kvm.h
KVM_EXIT_MEMORY_FAULT = 39
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3  # run->memory_fault.flags: the access was private
TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION = 6  # extended exit qualification type [KVM-new]
# Not in tdx-reference.md: the type bits of the extended exit qualification (kvm_exit's info2
# on a TD, tdx_get_exit_info()), and type 1, "the guest's TDG.MEM.PAGE.ACCEPT caused this EPT
# violation", from tdx_arch.h in the TDX huge-page series (LKML, 2025). The module does not
# count such violations toward zero-step (tdx-reference §5.1), so zero_step needs the type.
TDX_EXT_EXIT_QUAL_TYPE_MASK = 0xF  # GENMASK(3, 0)
TDX_EXT_EXIT_QUAL_TYPE_ACCEPT = 1  # info (bits 63:32): the accept level - 1 in bits 2:0
EPT_VIOLATION_ACC_WRITE = 1 << 1  # exit-qualification bit KVM forces on private faults
# Not in tdx-reference.md: the SDM's EPT-violation exit-qualification bits (Linux vmx.h names).
# Hardware sets GVA_IS_VALID on every violation a TD can cause (it clears it only for PAE PDPTE
# loads and Intel PT's trace-address pre-translation); the module's zero-step exit
# (emulate_ept_violation_td_exit() in its source) sets ACC_WRITE alone, and an exit the guest's
# TDG.MEM.PAGE.ACCEPT caused carries 0 (the type is in the extended exit qualification).
EPT_VIOLATION_GVA_IS_VALID = 1 << 7
EPT_VIOLATION_GVA_TRANSLATED = 1 << 8
# A guest's write to the page itself, and the module's zero-step exit (0x182 and 0x2).
EXIT_QUAL_GUEST_WRITE = (EPT_VIOLATION_ACC_WRITE | EPT_VIOLATION_GVA_IS_VALID
                         | EPT_VIOLATION_GVA_TRANSLATED)
EXIT_QUAL_ZERO_STEP = EPT_VIOLATION_ACC_WRITE
PAGE_SIZE = 4096
TDX_PS_4K = 0
TDX_PS_2M = 1
TDX_PS_1G = 2
PG_LEVEL_4K = 1  # the kernel's enum pg_level, which tdx_level() converts
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
EAGAIN = 11  # Linux errno values userspace returns in run->hypercall.ret
EINVAL = 22
