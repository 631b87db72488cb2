"""The deterministic emulator of KVM driving the TDX module (design.md §5).

One module per model or sequence:

* kernel: discrete events in integer ns, named random streams; costs: duration distributions;
* the TDX module: locks (try-locks), module (S-EPT, TLB epochs, zero-step, VP.ENTER),
  module_teardown (creation and teardown leaves, KOT and WB-cache rules);
* KVM: kvm (vCPU run loop, SEAMCALL issue, kicks, KVM_BUG_ON), mmu (mmu_lock, mirror SPTEs),
  fault (private fault path, local retry), zap (BLOCK/TRACK/REMOVE/WBINVD, tdh_do_no_vcpus),
  roots, roots_zap, roots_guest (shared root, invalidation, zap scope), lifecycle, process,
  teardown_pages (creation, teardown, HKID release), migration (vCPU load, VP.FLUSH),
  mapgpa (TDVMCALL<MapGPA> guest and KVM sides);
* the guest and the VMM: guest (workloads), mapgpa_vmm (VMM answers), faults (injection);
* wiring: scenario (validated TOML), world (one host), recorder (rows to Arrow batches),
  emulator (entry points for record, replay and benchmarks).

The emulator knows nothing of files: it hands record batches to a sink.
"""
