"""The kernel fast path: ChannelData relayed by a BPF program on the relay and listener
sockets' receive path (`channel_relay.bpf.c`, its structs in `channel_relay.h`), loaded
through libbpf (`program`), kept in step with the core's channels and permissions
(`flows`), with next hops from rtnetlink (`routes`). The core decides; this layer tells
the kernel; anything unusual is passed up to user space unchanged and counted."""
