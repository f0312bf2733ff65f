// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* What the kernel fast path's program (channel_relay.bpf.c) and user space
 * (io/kernel/program.py) share: the maps' keys and values and the reasons a packet goes
 * up to user space. program.py's layout and reason names are checked against this file
 * (tests/unit/test_kernel_header.py); the _Static_asserts below are those figures. */
#ifndef TURN_CHANNEL_RELAY_H
#define TURN_CHANNEL_RELAY_H

#include <linux/types.h>

#define CHANNEL_DATA_HEADER_LEN 4 /* RFC 8656 §12.4: channel number, length */
#define CHANNEL_FIRST_BYTE_MIN 0x40 /* RFC 8656 §12: channel numbers 0x4000-0x7FFF */
#define CHANNEL_FIRST_BYTE_MAX 0x7f

struct client_key {      /* a client's 5-tuple to a listener, and the channel */
	__u32 client_ip; /* network byte order, like everything in the keys and values */
	__u32 server_ip;
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
};

struct client_value {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 ifindex;   /* towards the peer; 0: up this host's stack */
	__u32 owner;     /* the worker that installed it (user space's bookkeeping) */
	__u32 pad;
	__u64 packets;
	__u64 bytes;
};

struct peer_key {        /* a peer and the relayed address it sends to */
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
};

struct peer_value {
	__u32 client_ip;
	__u32 server_ip;
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
	__u32 ifindex;   /* towards the client; 0: up this host's stack */
	__u32 owner;
	__u64 packets;
	__u64 bytes;
};

/* The same for IPv6 (addresses of 16 bytes; client, relay and peer of one family). */
struct client_key6 {
	__u32 client_ip[4];
	__u32 server_ip[4];
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
};

struct client_value6 {
	__u32 relay_ip[4];
	__u32 peer_ip[4];
	__u16 relay_port;
	__u16 peer_port;
	__u32 ifindex;
	__u32 owner;
	__u32 pad;
	__u64 packets;
	__u64 bytes;
};

struct peer_key6 {
	__u32 relay_ip[4];
	__u32 peer_ip[4];
	__u16 relay_port;
	__u16 peer_port;
};

struct peer_value6 {
	__u32 client_ip[4];
	__u32 server_ip[4];
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
	__u32 ifindex;
	__u32 owner;
	__u64 packets;
	__u64 bytes;
};

enum pass_reason {       /* why a packet of a known flow went up to user space */
	PASS_IP_OPTIONS,
	PASS_FRAGMENT,
	PASS_GSO,
	PASS_LENGTH,     /* ChannelData length and UDP length disagree (padding, truncation) */
	PASS_MTU,
	PASS_ADJUST,     /* a helper refused */
	PASS_TTL,        /* TTL 0 or 1: user space sends it with the default TTL */
	PASS_CHECKSUM_PARTIAL, /* to another host, checksum not yet computed (channel_relay.bpf.c) */
	PASS_IPV6_ZERO_CHECKSUM, /* IPv6 UDP checksum 0 (RFC 8200 §8.1): the stack drops it */
	PASS_REASONS,
};

/* key size, value size, where the owner and the counters sit (program.py's _LAYOUT) */
_Static_assert(sizeof(struct client_key) == 16, "client_key");
_Static_assert(sizeof(struct client_value) == 40, "client_value");
_Static_assert(__builtin_offsetof(struct client_value, owner) == 16, "client_value.owner");
_Static_assert(__builtin_offsetof(struct client_value, packets) == 24, "client_value.packets");
_Static_assert(sizeof(struct peer_key) == 12, "peer_key");
_Static_assert(sizeof(struct peer_value) == 40, "peer_value");
_Static_assert(__builtin_offsetof(struct peer_value, owner) == 20, "peer_value.owner");
_Static_assert(__builtin_offsetof(struct peer_value, packets) == 24, "peer_value.packets");
_Static_assert(sizeof(struct client_key6) == 40, "client_key6");
_Static_assert(sizeof(struct client_value6) == 64, "client_value6");
_Static_assert(__builtin_offsetof(struct client_value6, owner) == 40, "client_value6.owner");
_Static_assert(__builtin_offsetof(struct client_value6, packets) == 48, "client_value6.packets");
_Static_assert(sizeof(struct peer_key6) == 36, "peer_key6");
_Static_assert(sizeof(struct peer_value6) == 64, "peer_value6");
_Static_assert(__builtin_offsetof(struct peer_value6, owner) == 44, "peer_value6.owner");
_Static_assert(__builtin_offsetof(struct peer_value6, packets) == 48, "peer_value6.packets");

#endif
