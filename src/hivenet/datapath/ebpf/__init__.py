"""The eBPF datapath: established flows forwarded in the kernel (tc + BPF maps), the rest by the
userspace datapath it extends. `datapath.EbpfDatapath` is the `Datapath`; `entries` is the pure
megaflow-to-kernel-entry translation; `kernel` makes and removes the kernel objects; `bpfsys`
is the bpf(2) shim; `bpf/hn_fastpath.c` is the program, compiled by `make`.
"""
