// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Kernel fast path for channel-bound UDP allocations (RFC 8656 §12), TC clsact ingress.
 *
 * client -> peer: a UDP datagram to one of our listeners that is ChannelData for a
 *   bound channel loses its 4-byte ChannelData header and leaves from the relayed
 *   address to the peer.
 * peer -> client: a UDP datagram from a bound peer to a relayed address gains the
 *   ChannelData header and leaves from the listener to the client.
 *
 * Python keeps the control plane: it installs an entry only after ChannelBind succeeded
 * with a live permission and removes it on expiry, Refresh 0, deletion and policy
 * changes. Both IPv4 and IPv6 (client, relayed address and peer of one family). Anything
 * this program is unsure of goes up to user space unchanged (IP options and IPv6
 * extension headers, fragments, GSO packets, padded or truncated ChannelData, packets
 * that would exceed the MTU, TTL 1), counted by reason.
 *
 * Next hop: an entry's `ifindex` is 0 when the destination is an address of this host
 * (the packet continues up this host's stack, TC_ACT_OK) or the interface user space
 * found the route through (bpf_redirect_neigh: the kernel's FIB and neighbour tables
 * fill in the link layer; no IP forwarding needed).
 *
 * Checksums, per ip_summed state:
 * - IPv4 up this host's stack: UDP checksum 0 ("no checksum", RFC 768), accepted in
 *   every state (udp4_csum_init).
 * - out of an interface (and IPv6 anywhere: its UDP checksum is mandatory),
 *   CHECKSUM_NONE / UNNECESSARY / COMPLETE: the received UDP checksum is updated
 *   incrementally (RFC 1624) for the new addresses, ports, length and the ChannelData
 *   header; the payload moves by 4 bytes, an even offset, so its sum is unchanged. A
 *   received IPv4 0 stays 0; a received IPv6 0 goes up (the stack drops it).
 * - CHECKSUM_PARTIAL (a sender on this host, through veth or lo): the field holds the
 *   pseudo-header's sum for the device to complete at csum_start. That seed is updated
 *   for the new pseudo-header. bpf_skb_adjust_room does not move csum_start
 *   (net/core/filter.c), so out of an interface the UDP header stays where it is and the
 *   payload moves instead (shift_payload; up to 1,536 bytes, longer ones go up).
 * The IPv4 header checksum is recomputed; the TTL is decremented (RFC 8656 §14.3,
 * preferred behaviour: a packet that arrives with TTL 1 or 0 goes up to user space).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>

#include "channel_relay.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH); /* not LRU: an entry is a live binding */
	__uint(max_entries, 65536);
	__type(key, struct client_key);
	__type(value, struct client_value);
} client_to_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct peer_key);
	__type(value, struct peer_value);
} peer_to_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct client_key6);
	__type(value, struct client_value6);
} client_to_peer6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct peer_key6);
	__type(value, struct peer_value6);
} peer_to_client6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PASS_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} pass_reasons SEC(".maps");

/* Unchanged: on to the next tc filter (another program on this hook, a CNI's), then up
 * the stack as if we were not here. */
#define PASS_ON TC_ACT_UNSPEC

static __always_inline int pass(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&pass_reasons, &reason);
	if (n)
		*n += 1;
	return PASS_ON;
}

#define ETH_LEN sizeof(struct ethhdr)
#define IP_LEN sizeof(struct iphdr)
#define IP6_LEN sizeof(struct ipv6hdr)
#define UDP_LEN sizeof(struct udphdr)
#define IP_OFF ETH_LEN
#define L4_OFF (ETH_LEN + IP_LEN)
#define CHECKSUM_PARTIAL 3
#define CD_LEN CHANNEL_DATA_HEADER_LEN
#define IP_FRAGMENT_BITS 0x3fff /* RFC 791: More Fragments and the fragment offset */

/* The kernel's sk_buff, only what we read (CO-RE: libbpf finds the real offsets). */
struct sk_buff___turn {
	__u8 ip_summed:2;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

static __always_inline int checksum_partial(struct __sk_buff *skb)
{
	struct sk_buff___turn *k = bpf_cast_to_kern_ctx(skb);
	return BPF_CORE_READ_BITFIELD(k, ip_summed) == CHECKSUM_PARTIAL;
}

static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum;
}

/* The IPv4 header at IP_OFF, written whole: the caller's fields, a checksum computed
 * afresh. */
static __always_inline int store_ip_header(struct __sk_buff *skb, struct iphdr *ip)
{
	__u16 *words = (__u16 *)ip;
	__u32 sum = 0;

	ip->check = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += words[i];
	ip->check = ~fold(sum);
	return bpf_skb_store_bytes(skb, IP_OFF, ip, IP_LEN, 0);
}

/* RFC 1624: the received UDP checksum `check` with the words in `from` taken out of
 * the sum and those in `to` put in (sizes in bytes, multiples of 4). */
static __always_inline __u16 update_checksum(__u16 check, __be32 *from, __u32 from_size,
					     __be32 *to, __u32 to_size)
{
	if (!check) /* IPv4 "no checksum" stays so */
		return 0;
	__s64 sum = bpf_csum_diff(from, from_size, to, to_size, (__u16)~check);
	if (sum < 0)
		return 0;
	__u16 out = ~fold((__u32)sum);
	return out ? out : 0xffff; /* a computed 0 is sent as all ones (RFC 768) */
}

/* CHECKSUM_PARTIAL: the field holds the pseudo-header's sum, not complemented, for the
 * device to complete; replace the old pseudo-header words with the new ones. */
static __always_inline __u16 update_partial(__u16 seed, __be32 *from, __be32 *to, __u32 size)
{
	__s64 sum = bpf_csum_diff(from, size, to, size, seed);
	return sum < 0 ? seed : fold((__u32)sum);
}

/* A rewritten packet leaves: up this host's stack, or out of `ifindex` to the next hop. */
static __always_inline int deliver(__u32 ifindex)
{
	if (!ifindex)
		return TC_ACT_OK;
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}

#define CHUNK 128
#define MAX_CHUNKS 12 /* CHECKSUM_PARTIAL payloads up to 1,536 bytes move; longer go up */

/* CHECKSUM_PARTIAL out of an interface: the device completes the UDP checksum at
 * csum_start, where the UDP header is now, so the header must stay and the payload
 * (`len` bytes at `at`) moves by `shift` (+4 or -4), the packet's end with it. Only a
 * failed helper (never expected once the lengths are checked) leaves it half moved. */
static __always_inline int shift_payload(struct __sk_buff *skb, __u64 at, __u64 len, int shift)
{
	__u8 buf[CHUNK];

	if (shift > 0 && bpf_skb_change_tail(skb, skb->len + shift, 0) < 0)
		return -1;
	for (int i = 0; i < MAX_CHUNKS; i++) {
		__u64 done = i * CHUNK; /* 64-bit: sizes the verifier can bound */
		if (done >= len)
			break;
		__u64 n = len - done;
		if (n > CHUNK)
			n = CHUNK;
		if (n < 1)
			break;
		__u64 off = shift > 0 ? len - done - n : done; /* to the right: from the end */
		if (bpf_skb_load_bytes(skb, at + off, buf, n) < 0 ||
		    bpf_skb_store_bytes(skb, at + off + shift, buf, n, 0) < 0)
			return -1;
	}
	if (shift < 0 && bpf_skb_change_tail(skb, skb->len + shift, 0) < 0)
		return -1;
	return 0;
}

enum resize_result {
	RESIZED = 0,
	RESIZE_REFUSED = -1, /* a helper refused before anything moved: up, unchanged */
	RESIZE_BROKEN = -2,  /* the payload half moved: dropped, never delivered corrupt */
};

/* Make room for the new headers: CD_LEN bytes fewer or more between the IP header and
 * the payload. Either the headers move (bpf_skb_adjust_room at the network header) or,
 * for CHECKSUM_PARTIAL leaving through an interface, the payload does. */
static __always_inline int resize(struct __sk_buff *skb, __u32 l4, __u32 payload_at,
				  __u32 payload_len, int shift, int move_payload)
{
	if (move_payload)
		return shift_payload(skb, l4 + payload_at, payload_len, shift) < 0 ? RESIZE_BROKEN
										     : RESIZED;
	return bpf_skb_adjust_room(skb, shift, BPF_ADJ_ROOM_NET, 0) < 0 ? RESIZE_REFUSED : RESIZED;
}

/* The tail every rewrite shares, both ways and both families: make room for the new
 * headers, write the L4 headers (`l4`) and the IP header, count the payload, deliver.
 * A refused resize leaves the packet as it was (up, counted); anything half written is
 * dropped. */
static __always_inline int finish(struct __sk_buff *skb, __u32 l4_off, __u32 payload_at,
				  __u32 payload_len, int shift, int move_payload, void *l4,
				  __u32 l4_len, void *ip_head, int ipv6, __u64 *packets,
				  __u64 *bytes, __u32 ifindex)
{
	int err = resize(skb, l4_off, payload_at, payload_len, shift, move_payload);

	if (err == RESIZE_REFUSED)
		return pass(PASS_ADJUST);
	if (err != RESIZED)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, l4_off, l4, l4_len, 0) < 0)
		return TC_ACT_SHOT;
	if (ipv6 ? bpf_skb_store_bytes(skb, IP_OFF, ip_head, IP6_LEN, 0) < 0
		 : store_ip_header(skb, ip_head) < 0)
		return TC_ACT_SHOT;
	__sync_fetch_and_add(packets, 1);
	__sync_fetch_and_add(bytes, payload_len);
	return deliver(ifindex);
}

/* A bound client's ChannelData: strip the header, send the payload to the peer. */
static __always_inline int to_peer(struct __sk_buff *skb, struct iphdr *ip,
				   struct udphdr *udp, struct client_value *v, int partial)
{
	__u16 udp_len = bpf_ntohs(udp->len);
	__u32 ifindex = v->ifindex;
	__be32 from[5] = {ip->saddr, ip->daddr, *(__be32 *)udp, 0, *(__be32 *)(udp + 1)};
	struct iphdr head = *ip;
	__u16 check = udp->check;

	head.tot_len = bpf_htons(bpf_ntohs(ip->tot_len) - CD_LEN);
	head.ttl -= 1;
	head.saddr = v->relay_ip;
	head.daddr = v->peer_ip;
	struct udphdr out = {
		.source = v->relay_port,
		.dest = v->peer_port,
		.len = bpf_htons(udp_len - CD_LEN),
	};
	int move = partial && ifindex;
	if (move) {
		__be32 pf[3] = {ip->saddr, ip->daddr, udp->len}, pt[3] = {head.saddr, head.daddr, out.len};
		out.check = update_partial(check, pf, pt, sizeof(pf));
	} else if (ifindex) {
		__be32 to[4] = {head.saddr, head.daddr, *(__be32 *)&out, out.len | out.len << 16};
		from[3] = udp->len | udp->len << 16; /* pseudo-header and header lengths */
		out.check = update_checksum(check, from, sizeof(from), to, sizeof(to));
	}
	/* adjust_room removes the 4 bytes right after the IP header (the UDP ports); the 8
	 * bytes from there on (UDP length and checksum, ChannelData header) become the new
	 * UDP header */
	return finish(skb, L4_OFF, UDP_LEN + CD_LEN, udp_len - UDP_LEN - CD_LEN, -CD_LEN, move,
		      &out, sizeof(out), &head, 0, &v->packets, &v->bytes, ifindex);
}

/* A bound peer's datagram: prepend the ChannelData header, send it to the client. */
static __always_inline int to_client(struct __sk_buff *skb, struct iphdr *ip,
				     struct udphdr *udp, struct peer_value *v, int partial)
{
	__u16 udp_len = bpf_ntohs(udp->len);
	__u32 ifindex = v->ifindex;
	__be32 from[4] = {ip->saddr, ip->daddr, *(__be32 *)udp, udp->len | udp->len << 16};
	struct iphdr head = *ip;
	__u16 check = udp->check;
	__u32 mtu = 0;

	if (bpf_check_mtu(skb, ifindex, &mtu, CD_LEN, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return pass(PASS_MTU);
	head.tot_len = bpf_htons(bpf_ntohs(ip->tot_len) + CD_LEN);
	head.ttl -= 1;
	head.saddr = v->server_ip;
	head.daddr = v->client_ip;
	struct {
		struct udphdr udp;
		__u16 channel;
		__u16 length;
	} out = {
		.udp = {
			.source = v->server_port,
			.dest = v->client_port,
			.len = bpf_htons(udp_len + CD_LEN),
		},
		.channel = v->channel,
		.length = bpf_htons(udp_len - UDP_LEN),
	};
	int move = partial && ifindex;
	if (move) {
		__be32 pf[3] = {ip->saddr, ip->daddr, udp->len};
		__be32 pt[3] = {head.saddr, head.daddr, out.udp.len};
		out.udp.check = update_partial(check, pf, pt, sizeof(pf));
	} else if (ifindex) {
		__be32 to[5] = {head.saddr, head.daddr, *(__be32 *)&out.udp,
				out.udp.len | out.udp.len << 16, *(__be32 *)&out.channel};
		out.udp.check = update_checksum(check, from, sizeof(from), to, sizeof(to));
	}
	/* adjust_room adds 4 bytes after the IP header: with the old UDP header's 8 they
	 * make the new UDP header and the ChannelData header */
	return finish(skb, L4_OFF, UDP_LEN, udp_len - UDP_LEN, CD_LEN, move, &out, sizeof(out),
		      &head, 0, &v->packets, &v->bytes, ifindex);
}

/* IPv6 (RFC 8200): no header checksum; the UDP checksum is mandatory (a received 0 goes
 * up, where the stack drops it), so it is updated for local delivery too. */
#define L4_OFF6 (ETH_LEN + IP6_LEN)
#define IP6_ADDRS_LEN 32 /* source and destination: the pseudo-header's addresses */
#define ADDR6_WORDS (IP6_ADDRS_LEN / 4)
/* CHECKSUM_PARTIAL's seed covers the pseudo-header: the addresses and the length word */
#define PSEUDO6_PARTIAL_LEN (IP6_ADDRS_LEN + 4)

static __always_inline int to_peer6(struct __sk_buff *skb, struct ipv6hdr *ip, struct udphdr *udp,
				    struct client_value6 *v, int partial)
{
	__u16 udp_len = bpf_ntohs(udp->len);
	__u32 ifindex = v->ifindex;
	__u16 check = udp->check;
	struct ipv6hdr head = *ip;
	struct udphdr out = {
		.source = v->relay_port,
		.dest = v->peer_port,
		.len = bpf_htons(udp_len - CD_LEN),
	};
	/* old and new: addresses, then length (pseudo-header and UDP header), ports,
	 * ChannelData header (old only) */
	__be32 from[ADDR6_WORDS + 3], to[ADDR6_WORDS + 2];
	__builtin_memcpy(from, &ip->saddr, IP6_ADDRS_LEN);
	__builtin_memcpy(&to[0], v->relay_ip, 16);
	__builtin_memcpy(&to[4], v->peer_ip, 16);
	__builtin_memcpy(&head.saddr, v->relay_ip, 16);
	__builtin_memcpy(&head.daddr, v->peer_ip, 16);
	head.payload_len = out.len;
	head.hop_limit -= 1;
	if (partial) {
		from[ADDR6_WORDS] = udp->len;
		to[ADDR6_WORDS] = out.len;
		out.check = update_partial(check, from, to, PSEUDO6_PARTIAL_LEN);
	} else {
		from[ADDR6_WORDS] = udp->len | udp->len << 16;
		from[ADDR6_WORDS + 1] = *(__be32 *)udp;
		from[ADDR6_WORDS + 2] = *(__be32 *)(udp + 1);
		to[ADDR6_WORDS] = out.len | out.len << 16;
		to[ADDR6_WORDS + 1] = *(__be32 *)&out;
		out.check = update_checksum(check, from, sizeof(from), to, sizeof(to));
	}
	return finish(skb, L4_OFF6, UDP_LEN + CD_LEN, udp_len - UDP_LEN - CD_LEN, -CD_LEN,
		      partial && ifindex, &out, sizeof(out), &head, 1, &v->packets, &v->bytes,
		      ifindex);
}

static __always_inline int to_client6(struct __sk_buff *skb, struct ipv6hdr *ip,
				      struct udphdr *udp, struct peer_value6 *v, int partial)
{
	__u16 udp_len = bpf_ntohs(udp->len);
	__u32 ifindex = v->ifindex;
	__u16 check = udp->check;
	struct ipv6hdr head = *ip;
	__u32 mtu = 0;
	struct {
		struct udphdr udp;
		__u16 channel;
		__u16 length;
	} out = {
		.udp = {
			.source = v->server_port,
			.dest = v->client_port,
			.len = bpf_htons(udp_len + CD_LEN),
		},
		.channel = v->channel,
		.length = bpf_htons(udp_len - UDP_LEN),
	};
	__be32 from[ADDR6_WORDS + 2], to[ADDR6_WORDS + 3];

	if (bpf_check_mtu(skb, ifindex, &mtu, CD_LEN, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return pass(PASS_MTU);
	__builtin_memcpy(from, &ip->saddr, IP6_ADDRS_LEN);
	__builtin_memcpy(&to[0], v->server_ip, 16);
	__builtin_memcpy(&to[4], v->client_ip, 16);
	__builtin_memcpy(&head.saddr, v->server_ip, 16);
	__builtin_memcpy(&head.daddr, v->client_ip, 16);
	head.payload_len = out.udp.len;
	head.hop_limit -= 1;
	if (partial) {
		from[ADDR6_WORDS] = udp->len;
		to[ADDR6_WORDS] = out.udp.len;
		out.udp.check = update_partial(check, from, to, PSEUDO6_PARTIAL_LEN);
	} else {
		from[ADDR6_WORDS] = udp->len | udp->len << 16;
		from[ADDR6_WORDS + 1] = *(__be32 *)udp;
		to[ADDR6_WORDS] = out.udp.len | out.udp.len << 16;
		to[ADDR6_WORDS + 1] = *(__be32 *)&out.udp;
		to[ADDR6_WORDS + 2] = *(__be32 *)&out.channel;
		out.udp.check = update_checksum(check, from, sizeof(from), to, sizeof(to));
	}
	return finish(skb, L4_OFF6, UDP_LEN, udp_len - UDP_LEN, CD_LEN, partial && ifindex, &out,
		      sizeof(out), &head, 1, &v->packets, &v->bytes, ifindex);
}

static __always_inline int relay6(struct __sk_buff *skb, void *data, void *end)
{
	struct ipv6hdr *ip = data + ETH_LEN;
	struct udphdr *udp = (void *)(ip + 1);
	__u8 *cd = (__u8 *)(udp + 1);

	/* extension headers (fragments among them) make nexthdr something else: up */
	if ((void *)(udp + 1) > end || ip->nexthdr != IPPROTO_UDP)
		return PASS_ON;
	__u16 udp_len = bpf_ntohs(udp->len);
	struct peer_key6 pk = {.relay_port = udp->dest, .peer_port = udp->source};
	__builtin_memcpy(pk.relay_ip, &ip->daddr, 16);
	__builtin_memcpy(pk.peer_ip, &ip->saddr, 16);
	struct peer_value6 *pv = bpf_map_lookup_elem(&peer_to_client6, &pk);
	struct client_value6 *cv = 0;
	__u32 ifindex;
	if (pv) {
		ifindex = pv->ifindex;
	} else {
		if ((void *)(cd + CD_LEN) > end || cd[0] < CHANNEL_FIRST_BYTE_MIN ||
		    cd[0] > CHANNEL_FIRST_BYTE_MAX)
			return PASS_ON;
		struct client_key6 ck = {
			.client_port = udp->source,
			.server_port = udp->dest,
			.channel = *(__u16 *)cd,
		};
		__builtin_memcpy(ck.client_ip, &ip->saddr, 16);
		__builtin_memcpy(ck.server_ip, &ip->daddr, 16);
		cv = bpf_map_lookup_elem(&client_to_peer6, &ck);
		if (!cv)
			return PASS_ON;
		__u16 cd_len = ((__u16)cd[2] << 8) | cd[3];
		if (cd_len + CD_LEN + UDP_LEN != udp_len)
			return pass(PASS_LENGTH);
		ifindex = cv->ifindex;
	}
	if (skb->gso_segs > 1 || skb->gso_size)
		return pass(PASS_GSO);
	if (bpf_ntohs(ip->payload_len) != udp_len || udp_len < UDP_LEN ||
	    skb->len != ETH_LEN + IP6_LEN + udp_len)
		return pass(PASS_LENGTH);
	if (ip->hop_limit <= 1)
		return pass(PASS_TTL);
	if (!udp->check)
		return pass(PASS_IPV6_ZERO_CHECKSUM);
	int partial = checksum_partial(skb);
	if (ifindex && partial && udp_len > UDP_LEN + CHUNK * MAX_CHUNKS)
		return pass(PASS_CHECKSUM_PARTIAL);
	if (pv)
		return to_client6(skb, ip, udp, pv, partial);
	if ((void *)(cd + CD_LEN) > end)
		return PASS_ON;
	return to_peer6(skb, ip, udp, cv, partial);
}

SEC("tc")
int turn_channel_relay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_LEN;

	if ((void *)(ip + 1) > end)
		return PASS_ON;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return relay6(skb, data, end);
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != IPPROTO_UDP)
		return PASS_ON;
	__u32 ihl = ip->ihl * 4;
	if (ihl < IP_LEN || ihl > 60)
		return PASS_ON;
	struct udphdr *udp = data + ETH_LEN + ihl;
	__u8 *cd = (__u8 *)(udp + 1);
	if ((void *)(udp + 1) > end)
		return PASS_ON;
	__u16 tot_len = bpf_ntohs(ip->tot_len);
	__u16 udp_len = bpf_ntohs(udp->len);

	struct peer_key pk = {
		.relay_ip = ip->daddr,
		.peer_ip = ip->saddr,
		.relay_port = udp->dest,
		.peer_port = udp->source,
	};
	struct peer_value *pv = bpf_map_lookup_elem(&peer_to_client, &pk);
	struct client_value *cv = 0;
	__u32 ifindex;
	if (pv) {
		ifindex = pv->ifindex;
	} else {
		if ((void *)(cd + CD_LEN) > end || cd[0] < CHANNEL_FIRST_BYTE_MIN ||
		    cd[0] > CHANNEL_FIRST_BYTE_MAX)
			return PASS_ON;
		struct client_key ck = {
			.client_ip = ip->saddr,
			.server_ip = ip->daddr,
			.client_port = udp->source,
			.server_port = udp->dest,
			.channel = *(__u16 *)cd,
		};
		cv = bpf_map_lookup_elem(&client_to_peer, &ck);
		if (!cv)
			return PASS_ON; /* not a bound channel: user space decides */
		__u16 cd_len = ((__u16)cd[2] << 8) | cd[3];
		if (cd_len + CD_LEN + UDP_LEN != udp_len)
			return pass(PASS_LENGTH);
		ifindex = cv->ifindex;
	}
	/* a flow we relay: anything unusual goes up to user space, counted */
	if (ihl != IP_LEN)
		return pass(PASS_IP_OPTIONS);
	if (ip->frag_off & bpf_htons(IP_FRAGMENT_BITS))
		return pass(PASS_FRAGMENT);
	if (skb->gso_segs > 1 || skb->gso_size)
		return pass(PASS_GSO);
	if (tot_len != IP_LEN + udp_len || udp_len < UDP_LEN || skb->len != ETH_LEN + tot_len)
		return pass(PASS_LENGTH);
	if (ip->ttl <= 1)
		return pass(PASS_TTL);
	int partial = checksum_partial(skb);
	if (ifindex && partial && udp_len > UDP_LEN + CHUNK * MAX_CHUNKS)
		return pass(PASS_CHECKSUM_PARTIAL);
	if (pv)
		return to_client(skb, ip, udp, pv, partial);
	if ((void *)(cd + CD_LEN) > end) /* checked above; the verifier wants it on this path */
		return PASS_ON;
	return to_peer(skb, ip, udp, cv, partial);
}

/* The SPDX line's two licenses; the kernel reads "Dual BSD/GPL" as GPL-compatible, which
 * the GPL-only helpers need. */
char LICENSE[] SEC("license") = "Dual BSD/GPL";
