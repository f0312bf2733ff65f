// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
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
 * changes. Anything this program is unsure of goes up to user space unchanged (IPv6 in
 * this version, IP options, fragments, GSO packets, padded or truncated ChannelData,
 * packets that would exceed the MTU), counted by reason.
 *
 * The rewritten packet continues up this host's stack (TC_ACT_OK): user space installs
 * only flows whose client and peer are addresses of this host. Sending to remote hosts
 * (bpf_redirect_neigh) needs the CHECKSUM_PARTIAL case solved first: bpf_skb_adjust_room
 * does not move csum_start, so a locally generated packet leaving through a NIC would
 * get its checksum written 4 bytes off. For local delivery an IPv4 UDP checksum of 0
 * ("no checksum", RFC 768) is accepted in every ip_summed state (udp4_csum_init); the IP
 * header checksum is recomputed.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

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
	PASS_REASONS,
};

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
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PASS_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} pass_reasons SEC(".maps");

static __always_inline int pass(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&pass_reasons, &reason);
	if (n)
		*n += 1;
	return TC_ACT_OK;
}

#define ETH_LEN sizeof(struct ethhdr)
#define IP_LEN sizeof(struct iphdr)
#define UDP_LEN sizeof(struct udphdr)
#define IP_OFF ETH_LEN
#define L4_OFF (ETH_LEN + IP_LEN)

/* The IPv4 header checksum of the 20-byte header at IP_OFF, computed afresh. */
static __always_inline int fix_ip_checksum(struct __sk_buff *skb)
{
	__u16 words[10];
	__u32 sum = 0;

	if (bpf_skb_load_bytes(skb, IP_OFF, words, sizeof(words)) < 0)
		return -1;
	words[5] = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += words[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	__u16 check = ~sum;
	return bpf_skb_store_bytes(skb, IP_OFF + 10, &check, sizeof(check), 0);
}

/* A bound client's ChannelData: strip the header, send the payload to the peer. */
static __always_inline int to_peer(struct __sk_buff *skb, struct client_value *v,
				   __u16 udp_len, __u16 tot_len)
{
	__u32 relay_ip = v->relay_ip, peer_ip = v->peer_ip;
	__u16 relay_port = v->relay_port, peer_port = v->peer_port;

	/* removes the 4 bytes right after the IP header (the UDP ports); the 8 bytes
	 * from there on (UDP length and checksum, ChannelData header) become the new
	 * UDP header */
	if (bpf_skb_adjust_room(skb, -4, BPF_ADJ_ROOM_NET, 0) < 0)
		return pass(PASS_ADJUST);
	struct udphdr udp = {
		.source = relay_port,
		.dest = peer_port,
		.len = bpf_htons(udp_len - 4),
		.check = 0,
	};
	__u16 new_tot = bpf_htons(tot_len - 4);
	if (bpf_skb_store_bytes(skb, L4_OFF, &udp, sizeof(udp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF + 2, &new_tot, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF + 12, &relay_ip, 4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF + 16, &peer_ip, 4, 0) < 0 ||
	    fix_ip_checksum(skb) < 0)
		return TC_ACT_SHOT; /* half rewritten: never deliver a corrupt packet */
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, udp_len - UDP_LEN - 4);
	return TC_ACT_OK;
}

/* A bound peer's datagram: prepend the ChannelData header, send it to the client. */
static __always_inline int to_client(struct __sk_buff *skb, struct peer_value *v,
				     __u16 udp_len, __u16 tot_len)
{
	__u32 server_ip = v->server_ip, client_ip = v->client_ip;
	__u16 server_port = v->server_port, client_port = v->client_port;
	__u16 channel = v->channel;
	__u32 mtu = 0;

	if (bpf_check_mtu(skb, skb->ingress_ifindex, &mtu, 4, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return pass(PASS_MTU);
	/* 4 bytes after the IP header: with the old UDP header's 8 they make the new
	 * UDP header and the ChannelData header */
	if (bpf_skb_adjust_room(skb, 4, BPF_ADJ_ROOM_NET, 0) < 0)
		return pass(PASS_ADJUST);
	struct {
		struct udphdr udp;
		__u16 channel;
		__u16 length;
	} head = {
		.udp = {
			.source = server_port,
			.dest = client_port,
			.len = bpf_htons(udp_len + 4),
			.check = 0,
		},
		.channel = channel,
		.length = bpf_htons(udp_len - UDP_LEN),
	};
	__u16 new_tot = bpf_htons(tot_len + 4);
	if (bpf_skb_store_bytes(skb, L4_OFF, &head, sizeof(head), 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF + 2, &new_tot, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF + 12, &server_ip, 4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF + 16, &client_ip, 4, 0) < 0 ||
	    fix_ip_checksum(skb) < 0)
		return TC_ACT_SHOT;
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, udp_len - UDP_LEN);
	return TC_ACT_OK;
}

SEC("tc")
int turn_channel_relay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_LEN;

	if ((void *)(ip + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	__u32 ihl = ip->ihl * 4;
	if (ihl < IP_LEN || ihl > 60)
		return TC_ACT_OK;
	struct udphdr *udp = data + ETH_LEN + ihl;
	__u8 *cd = (__u8 *)(udp + 1);
	if ((void *)(udp + 1) > end)
		return TC_ACT_OK;
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
	if (!pv) {
		if ((void *)(cd + 4) > end || cd[0] < 0x40 || cd[0] > 0x7f)
			return TC_ACT_OK;
		struct client_key ck = {
			.client_ip = ip->saddr,
			.server_ip = ip->daddr,
			.client_port = udp->source,
			.server_port = udp->dest,
			.channel = *(__u16 *)cd,
		};
		cv = bpf_map_lookup_elem(&client_to_peer, &ck);
		if (!cv)
			return TC_ACT_OK; /* not a bound channel: user space decides */
		__u16 cd_len = ((__u16)cd[2] << 8) | cd[3];
		if (cd_len + 4 + UDP_LEN != udp_len)
			return pass(PASS_LENGTH);
	}
	/* a flow we relay: anything unusual goes up to user space, counted */
	if (ihl != IP_LEN)
		return pass(PASS_IP_OPTIONS);
	if (ip->frag_off & bpf_htons(0x3fff)) /* MF or an offset */
		return pass(PASS_FRAGMENT);
	if (skb->gso_segs > 1 || skb->gso_size)
		return pass(PASS_GSO);
	if (tot_len != IP_LEN + udp_len || udp_len < UDP_LEN || skb->len != ETH_LEN + tot_len)
		return pass(PASS_LENGTH);
	if (pv)
		return to_client(skb, pv, udp_len, tot_len);
	return to_peer(skb, cv, udp_len, tot_len);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
