// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
/* HiveNet kernel fast path: exact-match flows of established traffic at tc ingress.
 *
 * Programs (one object, maps shared, loaded and pinned by `bpftool prog loadall`):
 *   hn_port_ingress      tc ingress (direct action) of each bound VM port. A hit in hn_flows
 *                        applies the entry's rewrites and redirects to a local port or, with
 *                        bpf_skb_set_tunnel_key, to the collect-metadata VXLAN device. A miss
 *                        is dropped here: the agent's AF_PACKET tap saw it already.
 *   hn_port_upcall       socket filter on the agent's AF_PACKET socket of the same port: the
 *                        same key, the opposite answer (misses go up, hits do not), so every
 *                        frame is handled exactly once.
 *   hn_tunnel_ingress    tc ingress of the VXLAN device: deliver by tunnel key (hn_ports) to the
 *                        local port, no flow lookup (the ingress host already simulated);
 *                        any other key here came in IP fragments (no agent saw it): dropped.
 *                        Once the agent enforces tunnel peers (hn_config[HN_CONFIG_PEERS]), a
 *                        frame for a local port whose outer source is not in hn_tunnel_peers
 *                        is dropped (what goes to the agent, the agent checks and counts).
 *   hn_underlay_upcall   socket filter on the agent's AF_PACKET socket of the underlay: VXLAN
 *                        whose key is not a local port (flow-state messages, unknown keys) goes
 *                        to the agent, and so does VXLAN a peer's agent sent itself (marked
 *                        HN_VXLAN_AGENT_MARK in the last reserved byte): it may follow a
 *                        flow-state message that must be applied first, on the same socket.
 *                        So does every datagram the kernel's VXLAN device would drop without
 *                        a reason anyone can read (truncated, no I flag, a reserved bit set,
 *                        an inner frame shorter than Ethernet): the agent counts it by reason.
 *   hn_underlay_ingress  tc ingress of the underlay interface, the same verdict
 *                        (underlay_verdict): what the filter gave the agent is dropped here
 *                        (counted kernel_underlay_to_agent, not a drop), so the kernel never
 *                        handles a datagram a second time and drops nothing silently; the rest
 *                        passes to the stack and the VXLAN device.
 *
 * The key layout is mirrored in datapath/ebpf/entries.py (FLOW_KEY); a unit test checks the
 * sizes and a root test runs these programs on frames built by Python (BPF_PROG_TEST_RUN).
 * A routed entry (HN_DEC_TTL) takes only packets whose IPv4 header checksum is right.
 * Only untagged IPv4 TCP/UDP/ICMP without options or fragmentation is eligible; TCP with
 * SYN, FIN or RST always goes to the agent (connection state lives there). An entry with an
 * mtu is a miss for a packet whose IP length (of each segment, for GSO) exceeds it: the agent
 * answers with ICMP "fragmentation needed" or drops it (OVS's check_pkt_larger).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct hn_flow_key {
	__u32 ifindex;
	__u32 ip_src;
	__u32 ip_dst;
	__u16 tp_src;
	__u16 tp_dst;
	__u8 eth_src[6];
	__u8 eth_dst[6];
	__u8 ip_proto;
	__u8 ip_tos;
	__u8 ip_ttl;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 pad;
	__u16 icmp_id;
};

#define HN_SET_ETH_SRC (1U << 0)
#define HN_SET_ETH_DST (1U << 1)
#define HN_SET_IP_SRC (1U << 2)
#define HN_SET_IP_DST (1U << 3)
#define HN_SET_TP_SRC (1U << 4)
#define HN_SET_TP_DST (1U << 5)
#define HN_DEC_TTL (1U << 6)
#define HN_OUT_TUNNEL (1U << 7)

struct hn_flow_entry {
	__u64 packets;
	__u64 bytes;
	__u32 flags;
	__u32 out_ifindex;
	__u32 tunnel_id;
	__u32 tunnel_remote; /* IPv4, host byte order (bpf_tunnel_key.remote_ipv4) */
	__u32 ip_src;
	__u32 ip_dst;
	__u16 tp_src;
	__u16 tp_dst;
	__u8 eth_src[6];
	__u8 eth_dst[6];
	__u16 mtu; /* largest IP packet (per GSO segment) the entry takes; 0: no limit */
	__u8 pad[6];
};

enum hn_counter {
	HN_PORT_HITS,
	HN_PORT_MISSES,
	HN_TUNNEL_DELIVERED,
	HN_TUNNEL_UNKNOWN_KEY,
	HN_TUNNEL_FLOWSTATE,
	HN_ACTION_FAILED,
	HN_TUNNEL_UNKNOWN_SOURCE,
	HN_UNDERLAY_TO_AGENT,
	HN_TUNNEL_TOO_BIG,
	HN_COUNTER_MAX,
};

#define HN_FLOWSTATE_KEY 0xFFFFFF
#define HN_VXLAN_AGENT_MARK 0x01 /* datapath/ebpf/datapath.py VXLAN_AGENT_MARK */
#define HN_CONFIG_VXLAN_PORT 0
#define HN_CONFIG_PEERS 1 /* 1: accept tunnel packets only from hn_tunnel_peers */

/* LRU: a full map evicts the least recently used entry instead of refusing an insert. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct hn_flow_key);
	__type(value, struct hn_flow_entry);
} hn_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);   /* tunnel key of a local port */
	__type(value, __u32); /* ifindex of its interface */
} hn_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HN_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} hn_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} hn_config SEC(".maps");

/* Underlay addresses allowed to send us VXLAN: the live members of our tunnel zones. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);  /* IPv4, host byte order (bpf_tunnel_key.remote_ipv4) */
	__type(value, __u8); /* 1 */
} hn_tunnel_peers SEC(".maps");

/* Every frame tc ingress saw on each port, by ifindex: what the interface received and no
 * program saw died in the host's stack first (a truncated 802.1Q frame; the agent counts the
 * difference as drop.port_stack). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);   /* ifindex */
	__type(value, __u64); /* frames */
} hn_port_frames SEC(".maps");

#define ETH_HLEN_ 14
#define IP_OFF ETH_HLEN_
#define TCP_FLAGS_TO_AGENT 0x07 /* FIN | SYN | RST */

static __always_inline void count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&hn_counters, &index);

	if (value)
		__sync_fetch_and_add(value, 1);
}

struct hn_ipv4 {
	__u8 version_ihl;
	__u8 tos;
	__u16 total_length;
	__u16 id;
	__u16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u32 saddr;
	__u32 daddr;
};

/* 1 when the option-less IPv4 header sums to 0xFFFF (RFC 1071; byte order does not matter). */
static __always_inline int ipv4_header_ok(const struct hn_ipv4 *ip)
{
	const __u16 *words = (const __u16 *)ip;
	__u32 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < 10; i++)
		sum += words[i];
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return sum == 0xFFFF;
}

/* The exact-match key of an eligible frame, its IP length on the wire (of each segment of
 * a GSO frame) and whether its header checksum is right; -1 when the frame must go to the
 * agent. */
static __always_inline int parse_key(struct __sk_buff *skb, struct hn_flow_key *key,
				     __u32 *ip_length, int *header_ok)
{
	struct hn_ipv4 ip;
	__u8 l4[14];
	__u16 eth_type;

	if (skb->vlan_present)
		return -1;
	if (bpf_skb_load_bytes(skb, 0, key->eth_dst, 6) < 0 ||
	    bpf_skb_load_bytes(skb, 6, key->eth_src, 6) < 0 ||
	    bpf_skb_load_bytes(skb, 12, &eth_type, 2) < 0)
		return -1;
	if (eth_type != bpf_htons(ETH_P_IP))
		return -1;
	if (bpf_skb_load_bytes(skb, IP_OFF, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version_ihl != 0x45 || (ip.frag_off & bpf_htons(0x3FFF)))
		return -1;
	if (bpf_ntohs(ip.total_length) + ETH_HLEN_ > skb->len)
		return -1;
	key->ifindex = skb->ifindex;
	key->ip_src = ip.saddr;
	key->ip_dst = ip.daddr;
	key->ip_proto = ip.protocol;
	key->ip_tos = ip.tos;
	key->ip_ttl = ip.ttl;
	if (ip.protocol == IPPROTO_TCP) {
		if (bpf_ntohs(ip.total_length) < 40 ||
		    bpf_skb_load_bytes(skb, IP_OFF + 20, l4, 14) < 0)
			return -1;
		if (l4[13] & TCP_FLAGS_TO_AGENT)
			return -1;
	} else if (ip.protocol == IPPROTO_UDP || ip.protocol == IPPROTO_ICMP) {
		if (bpf_ntohs(ip.total_length) < 28 ||
		    bpf_skb_load_bytes(skb, IP_OFF + 20, l4, 8) < 0)
			return -1;
	} else {
		return -1;
	}
	*ip_length = bpf_ntohs(ip.total_length);
	*header_ok = ipv4_header_ok(&ip);
	if (skb->gso_size) {
		if (ip.protocol == IPPROTO_TCP)
			*ip_length = 20 + (l4[12] >> 4) * 4 + skb->gso_size;
		else
			*ip_length = 28 + skb->gso_size;
	}
	if (ip.protocol == IPPROTO_ICMP) {
		key->icmp_type = l4[0];
		key->icmp_code = l4[1];
		if (l4[0] == 0 || l4[0] == 8) /* echo reply / request */
			__builtin_memcpy(&key->icmp_id, &l4[4], 2);
	} else {
		__builtin_memcpy(&key->tp_src, &l4[0], 2);
		__builtin_memcpy(&key->tp_dst, &l4[2], 2);
	}
	return 0;
}

static __always_inline int l4_checksum_offset(__u8 protocol)
{
	if (protocol == IPPROTO_TCP)
		return IP_OFF + 20 + 16;
	if (protocol == IPPROTO_UDP)
		return IP_OFF + 20 + 6;
	return -1;
}

static __always_inline int rewrite_address(struct __sk_buff *skb, const struct hn_flow_key *key,
					   int field_offset, __u32 old, __u32 new)
{
	int csum_offset = l4_checksum_offset(key->ip_proto);
	__u64 flags = BPF_F_PSEUDO_HDR | sizeof(new);

	if (key->ip_proto == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	if (csum_offset >= 0 && bpf_l4_csum_replace(skb, csum_offset, old, new, flags) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, IP_OFF + 10, old, new, sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, IP_OFF + field_offset, &new, sizeof(new), 0);
}

static __always_inline int rewrite_port(struct __sk_buff *skb, const struct hn_flow_key *key,
					int field_offset, __u16 old, __u16 new)
{
	int csum_offset = l4_checksum_offset(key->ip_proto);
	__u64 flags = sizeof(new);

	if (csum_offset < 0)
		return -1;
	if (key->ip_proto == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, csum_offset, old, new, flags) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, IP_OFF + 20 + field_offset, &new, sizeof(new), 0);
}

static __always_inline int apply(struct __sk_buff *skb, const struct hn_flow_key *key,
				 const struct hn_flow_entry *entry)
{
	__u32 flags = entry->flags;

	if ((flags & HN_SET_ETH_DST) && bpf_skb_store_bytes(skb, 0, entry->eth_dst, 6, 0) < 0)
		return -1;
	if ((flags & HN_SET_ETH_SRC) && bpf_skb_store_bytes(skb, 6, entry->eth_src, 6, 0) < 0)
		return -1;
	if ((flags & HN_SET_IP_SRC) && rewrite_address(skb, key, 12, key->ip_src, entry->ip_src) < 0)
		return -1;
	if ((flags & HN_SET_IP_DST) && rewrite_address(skb, key, 16, key->ip_dst, entry->ip_dst) < 0)
		return -1;
	if ((flags & HN_SET_TP_SRC) && rewrite_port(skb, key, 0, key->tp_src, entry->tp_src) < 0)
		return -1;
	if ((flags & HN_SET_TP_DST) && rewrite_port(skb, key, 2, key->tp_dst, entry->tp_dst) < 0)
		return -1;
	if (flags & HN_DEC_TTL) {
		/* The 16-bit word TTL|protocol, as the IPv4 header checksum sees it. */
		__u16 old_word = bpf_htons(((__u16)key->ip_ttl << 8) | key->ip_proto);
		__u16 new_word = bpf_htons(((__u16)(key->ip_ttl - 1) << 8) | key->ip_proto);
		__u8 ttl = key->ip_ttl - 1;

		if (bpf_l3_csum_replace(skb, IP_OFF + 10, old_word, new_word, 2) < 0 ||
		    bpf_skb_store_bytes(skb, IP_OFF + 8, &ttl, 1, 0) < 0)
			return -1;
	}
	if (flags & HN_OUT_TUNNEL) {
		struct bpf_tunnel_key tunnel = {};

		tunnel.tunnel_id = entry->tunnel_id;
		tunnel.remote_ipv4 = entry->tunnel_remote;
		tunnel.tunnel_ttl = 64;
		if (bpf_skb_set_tunnel_key(skb, &tunnel, sizeof(tunnel), BPF_F_ZERO_CSUM_TX) < 0)
			return -1;
	}
	return 0;
}

/* The entry for this frame, or NULL: no key, no entry, larger than the entry's mtu, or a bad
 * IPv4 header checksum on a routed entry (the checksum is no key field, so a good packet's
 * entry must not carry a bad one; the agent drops and counts it). Both programs of a port
 * ask this, so they agree on every frame. */
static __always_inline struct hn_flow_entry *lookup(struct __sk_buff *skb,
						    struct hn_flow_key *key)
{
	struct hn_flow_entry *entry;
	__u32 ip_length = 0;
	int header_ok = 0;

	__builtin_memset(key, 0, sizeof(*key));
	if (parse_key(skb, key, &ip_length, &header_ok) < 0)
		return NULL;
	entry = bpf_map_lookup_elem(&hn_flows, key);
	if (entry && entry->mtu && ip_length > entry->mtu)
		return NULL;
	if (entry && (entry->flags & HN_DEC_TTL) && !header_ok)
		return NULL;
	return entry;
}

SEC("tc")
int hn_port_ingress(struct __sk_buff *skb)
{
	struct hn_flow_key key;
	struct hn_flow_entry *entry;
	__u32 segments = skb->gso_segs;
	__u32 ifindex = skb->ifindex;
	__u64 *frames = bpf_map_lookup_elem(&hn_port_frames, &ifindex);

	if (frames)
		__sync_fetch_and_add(frames, 1);
	entry = lookup(skb, &key);
	if (!entry)
		goto miss;
	__sync_fetch_and_add(&entry->packets, segments ? segments : 1);
	__sync_fetch_and_add(&entry->bytes, skb->len);
	if (apply(skb, &key, entry) < 0) {
		count(HN_ACTION_FAILED);
		return TC_ACT_SHOT;
	}
	count(HN_PORT_HITS);
	return bpf_redirect(entry->out_ifindex, 0);
miss:
	/* The agent's tap (hn_port_upcall) took this frame up already. */
	count(HN_PORT_MISSES);
	return TC_ACT_SHOT;
}

SEC("socket")
int hn_port_upcall(struct __sk_buff *skb)
{
	struct hn_flow_key key;

	if (lookup(skb, &key))
		return 0;
	return -1;
}

static __always_inline int tunnel_peer_allowed(__u32 remote_ipv4)
{
	__u32 config_index = HN_CONFIG_PEERS;
	__u32 *enforced = bpf_map_lookup_elem(&hn_config, &config_index);

	if (!enforced || !*enforced)
		return 1;
	return bpf_map_lookup_elem(&hn_tunnel_peers, &remote_ipv4) != NULL;
}

SEC("tc")
int hn_tunnel_ingress(struct __sk_buff *skb)
{
	struct bpf_tunnel_key tunnel = {};
	__u32 *ifindex;
	__u32 tunnel_key, mtu_length = 0;

	if (bpf_skb_get_tunnel_key(skb, &tunnel, sizeof(tunnel), 0) < 0) {
		count(HN_TUNNEL_UNKNOWN_KEY);
		return TC_ACT_SHOT;
	}
	tunnel_key = tunnel.tunnel_id;
	ifindex = bpf_map_lookup_elem(&hn_ports, &tunnel_key);
	if (!ifindex) {
		/* Unfragmented, these went to the agent (underlay_verdict) and never got here: a
		 * datagram the stack reassembled, which no agent socket saw. Dropped, counted. */
		count(tunnel_key == HN_FLOWSTATE_KEY ? HN_TUNNEL_FLOWSTATE : HN_TUNNEL_UNKNOWN_KEY);
		return TC_ACT_SHOT;
	}
	if (!tunnel_peer_allowed(tunnel.remote_ipv4)) {
		count(HN_TUNNEL_UNKNOWN_SOURCE);
		return TC_ACT_SHOT;
	}
	/* Larger than the port's MTU (a reassembled datagram): the veth would drop it, counted
	 * nowhere HiveNet reads. */
	if (bpf_check_mtu(skb, *ifindex, &mtu_length, 0, 0) != BPF_MTU_CHK_RET_SUCCESS) {
		count(HN_TUNNEL_TOO_BIG);
		return TC_ACT_SHOT;
	}
	count(HN_TUNNEL_DELIVERED);
	return bpf_redirect(*ifindex, 0);
}

#define HN_VXLAN_FLAG_I 0x08
#define HN_VXLAN_HLEN 8

enum hn_underlay_verdict {
	HN_UNDERLAY_PASS,   /* not unfragmented VXLAN for this host: the stack's */
	HN_UNDERLAY_AGENT,  /* the agent's (hn_underlay_upcall takes it up) */
	HN_UNDERLAY_KERNEL, /* a well-formed frame for a local port: the VXLAN device's */
};

/* Who handles a frame arriving on the underlay. Both underlay programs ask this, so each
 * VXLAN datagram is handled, and counted, exactly once. A fragmented datagram is the
 * stack's (reassembled, then the VXLAN device's and hn_tunnel_ingress's). */
static __always_inline int underlay_verdict(struct __sk_buff *skb)
{
	__u32 config_index = HN_CONFIG_VXLAN_PORT;
	struct hn_ipv4 ip;
	__u16 eth_type, udp_port;
	__u8 vxlan[HN_VXLAN_HLEN];
	__u32 *vxlan_port, tunnel_key, offset, payload;

	if (skb->pkt_type != PACKET_HOST)
		return HN_UNDERLAY_PASS;
	if (bpf_skb_load_bytes(skb, 12, &eth_type, 2) < 0 || eth_type != bpf_htons(ETH_P_IP))
		return HN_UNDERLAY_PASS;
	if (bpf_skb_load_bytes(skb, IP_OFF, &ip, sizeof(ip)) < 0)
		return HN_UNDERLAY_PASS;
	if ((ip.version_ihl >> 4) != 4 || ip.protocol != IPPROTO_UDP ||
	    (ip.frag_off & bpf_htons(0x3FFF)))
		return HN_UNDERLAY_PASS;
	offset = IP_OFF + (ip.version_ihl & 0x0F) * 4;
	vxlan_port = bpf_map_lookup_elem(&hn_config, &config_index);
	if (!vxlan_port || bpf_skb_load_bytes(skb, offset + 2, &udp_port, 2) < 0 ||
	    bpf_ntohs(udp_port) != *vxlan_port)
		return HN_UNDERLAY_PASS;
	/* The UDP payload by the IP length (the frame may carry Ethernet padding). */
	payload = bpf_ntohs(ip.total_length);
	if (payload < (offset - IP_OFF) + 8 + HN_VXLAN_HLEN + ETH_HLEN_)
		return HN_UNDERLAY_AGENT; /* truncated VXLAN or inner frame: the agent counts it */
	if (bpf_skb_load_bytes(skb, offset + 8, vxlan, sizeof(vxlan)) < 0)
		return HN_UNDERLAY_AGENT;
	/* RFC 7348 says ignore reserved bits; Linux's device drops such a frame (counting at most
	 * rx_errors), and an agent's mark is one: the agent delivers it. No I flag: it drops it. */
	if (vxlan[0] != HN_VXLAN_FLAG_I || vxlan[1] || vxlan[2] || vxlan[3] || vxlan[7])
		return HN_UNDERLAY_AGENT;
	tunnel_key = ((__u32)vxlan[4] << 16) | ((__u32)vxlan[5] << 8) | vxlan[6];
	if (bpf_map_lookup_elem(&hn_ports, &tunnel_key))
		return HN_UNDERLAY_KERNEL;
	return HN_UNDERLAY_AGENT;
}

SEC("socket")
int hn_underlay_upcall(struct __sk_buff *skb)
{
	return underlay_verdict(skb) == HN_UNDERLAY_AGENT ? -1 : 0;
}

SEC("tc")
int hn_underlay_ingress(struct __sk_buff *skb)
{
	if (underlay_verdict(skb) != HN_UNDERLAY_AGENT)
		return TC_ACT_OK;
	/* The agent's socket (a tap, ahead of tc) has it; the kernel must not handle it too. */
	count(HN_UNDERLAY_TO_AGENT);
	return TC_ACT_SHOT;
}

/* Offered under GPL-2.0 too (SPDX line above), as the kernel asks of BPF programs. */
char LICENSE[] SEC("license") = "GPL";
