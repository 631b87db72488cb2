"""The deterministic emulator of KVM driving the TDX module (design.md §5).

One module per model: :mod:`.kernel` (discrete events, random streams), :mod:`.costs`,
:mod:`.locks` and :mod:`.module` (the TDX module), :mod:`.kvm` and :mod:`.zap` (KVM),
:mod:`.guest`, :mod:`.vmm`, :mod:`.scenario` and :mod:`.emulator` (wiring). The emulator knows
nothing of files: it hands record batches to a sink.
"""
