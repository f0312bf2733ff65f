"""The kernel fast path's program (io/kernel/channel_relay.bpf.c) from Python, through
libbpf (`libbpf.so.1`, ctypes; no compiler on the server): load the compiled object,
run it on crafted packets with BPF_PROG_TEST_RUN, install and remove channel flows,
read their counters and the pass-up reasons, attach it to an interface's TC ingress.

Needs CAP_BPF and CAP_NET_ADMIN (root in the tests). Every failure is an OffloadError
that says why, so that a caller can fall back to the uvloop path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import socket
import struct
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).parent / "channel_relay.bpf.c"
PROGRAM = "turn_channel_relay"
# tc verdicts; UNSPEC: unchanged, on to the next filter and up the stack
TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = -1, 0, 2, 7
# enum pass_reason of channel_relay.h, in order (tests/unit/test_kernel_header.py)
PASS_REASONS = (
    "ip_options",
    "fragment",
    "gso",
    "length",
    "mtu",
    "adjust",
    "ttl",
    "checksum_partial",
    "ipv6_zero_checksum",
)
_BPF_TC_INGRESS = 1
BPF_TCX_INGRESS = 46  # enum bpf_attach_type, Linux 6.6 (newer than Debian 12's headers)
TC_HANDLE, TC_PRIORITY = 0x7475, 0x7475  # "tu": our filter on the interface
_BPF_ANY = 0
_COUNTERS = struct.Struct("=QQ")
# channel_relay.h: per map, (key size, value size, where the owner and the counters sit in
# the value), as its _Static_asserts state them; a value is the other direction's key,
# the interface, the owner, padding to 8 bytes, then the counters
_LAYOUT = {
    b"client_to_peer": (16, 40, 16, 24),
    b"peer_to_client": (12, 40, 20, 24),
    b"client_to_peer6": (40, 64, 40, 48),
    b"peer_to_client6": (36, 64, 44, 48),
}
_MAPS = (*_LAYOUT, b"pass_reasons")


def _addresses(*ips: str) -> bytes:
    """IPv4 or IPv6 addresses, packed (4 or 16 bytes each)."""
    family = socket.AF_INET6 if ":" in ips[0] else socket.AF_INET
    return b"".join(socket.inet_pton(family, ip) for ip in ips)


class OffloadError(OSError):
    """The kernel fast path cannot be used; the message says why."""


def _multiarch() -> str:
    """Debian's multiarch triplet (x86_64-linux-gnu, aarch64-linux-gnu, ...): where
    asm/types.h lives for the BPF target."""
    triplet = sysconfig.get_config_var("MULTIARCH")
    if triplet:
        return str(triplet)
    for cmd in (["dpkg-architecture", "-qDEB_HOST_MULTIARCH"], ["gcc", "-print-multiarch"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            continue
        if out:
            return out
    return f"{platform.machine()}-linux-gnu"


def clang_command(source: Path, output: Path) -> list[str]:
    """How the object is built (make bpf, the tests and the benchmarks use this): for
    this machine's architecture, and reproducibly (no build directory in the debug
    information), so the object shipped in the package can be checked against its
    source."""
    return [
        "clang",
        "-O2",
        "-g",
        "-target",
        "bpf",
        f"-I/usr/include/{_multiarch()}",
        f"-fdebug-prefix-map={source.parent.resolve()}=.",
        "-fdebug-compilation-dir=.",
        "-c",
        str(source),
        "-o",
        str(output),
    ]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _TcHook(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
    ]


class _TcOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise OffloadError(
            f"libbpf.so.1 is not installed ({exc}); Debian and Ubuntu: apt install libbpf1"
        ) from None
    vp, ci = ctypes.c_void_p, ctypes.c_int
    for fn, res, args in (
        ("bpf_object__open_file", vp, [ctypes.c_char_p, vp]),
        ("bpf_object__load", ci, [vp]),
        ("bpf_object__close", None, [vp]),
        ("bpf_object__find_program_by_name", vp, [vp, ctypes.c_char_p]),
        ("bpf_object__find_map_by_name", vp, [vp, ctypes.c_char_p]),
        ("bpf_program__fd", ci, [vp]),
        ("bpf_map__fd", ci, [vp]),
        ("bpf_map_update_elem", ci, [ci, vp, vp, ctypes.c_uint64]),
        ("bpf_map_lookup_elem", ci, [ci, vp, vp]),
        ("bpf_map_lookup_and_delete_elem", ci, [ci, vp, vp]),
        ("bpf_map_delete_elem", ci, [ci, vp]),
        ("bpf_map_get_next_key", ci, [ci, vp, vp]),
        ("bpf_prog_test_run_opts", ci, [ci, ctypes.POINTER(_TestRunOpts)]),
        ("bpf_tc_hook_create", ci, [ctypes.POINTER(_TcHook)]),
        ("bpf_tc_hook_destroy", ci, [ctypes.POINTER(_TcHook)]),
        ("bpf_tc_attach", ci, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
        ("bpf_tc_detach", ci, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
        ("libbpf_set_print", vp, [vp]),
        ("bpf_link_create", ci, [ci, ci, ci, vp]),
        ("bpf_prog_query", ci, [ci, ci, ctypes.c_uint32, vp, vp, vp]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    lib.libbpf_set_print(None)  # no warnings on our stderr; errors come back as errno
    return lib


NEEDS = "it needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or root"
_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_PERFMON": 38, "CAP_BPF": 39}
_CAP_SYS_ADMIN = 21  # before Linux 5.8, what CAP_BPF and CAP_PERFMON split from


def privileges_missing(status_file: str = "/proc/self/status") -> str:
    """What this process lacks to load and attach the program, read from its status:
    the capabilities it does not hold, or a seccomp filter (a container's default
    profile refuses bpf(2) without CAP_SYS_ADMIN); "" when nothing visible is missing."""
    try:
        with open(status_file, encoding="ascii") as fh:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    except (OSError, ValueError):
        return ""
    effective = int(fields.get("CapEff", "0"), 16)
    missing = [name for name, bit in _CAPABILITIES.items() if not effective >> bit & 1]
    if missing and not effective >> _CAP_SYS_ADMIN & 1:
        return f"{NEEDS}; this process lacks {', '.join(missing)}"
    if fields.get("Seccomp", "0").strip() == "2":
        return (
            "the capabilities are held, but a seccomp filter refuses bpf(2): in a container "
            "run with --security-opt seccomp=unconfined or a profile that allows bpf"
        )
    return ""


def _fail(what: str, ret: int) -> OffloadError:
    err = ctypes.get_errno() or -ret
    exc = OffloadError(f"{what}: {os.strerror(err)}")
    exc.errno = err
    return exc


@dataclass(frozen=True)
class ClientFlow:
    """A bound channel, client side: client -> listener, channel number; `ifindex` is
    the interface towards the client (0: an address of this host)."""

    client: tuple[str, int]
    server: tuple[str, int]
    channel: int
    ifindex: int = 0

    @property
    def map_names(self) -> tuple[bytes, bytes]:
        """This flow's maps: (client side, peer side), by address family."""
        return (b"client_to_peer6", b"peer_to_client6") if ":" in self.client[0] else _MAPS4

    def key(self) -> bytes:
        return _addresses(self.client[0], self.server[0]) + struct.pack(
            "!HHHxx", self.client[1], self.server[1], self.channel
        )


@dataclass(frozen=True)
class PeerFlow:
    """The same binding, peer side: peer -> relayed address; `ifindex` is the interface
    towards the peer (0: an address of this host)."""

    relay: tuple[str, int]
    peer: tuple[str, int]
    ifindex: int = 0

    def key(self) -> bytes:
        return _addresses(self.relay[0], self.peer[0]) + struct.pack(
            "!HH", self.relay[1], self.peer[1]
        )


_MAPS4 = (b"client_to_peer", b"peer_to_client")


class FlowMaps:
    """The program's maps (one per direction, plus pass-up reasons), as one process uses
    them: `owner` (a worker's index) is written into the entries it installs. Pickled
    into a spawned worker, the map descriptors go with it (the same maps, shared)."""

    def __init__(self, fds: dict[bytes, int], owner: int = 0) -> None:
        self.lib = _libbpf()
        self.maps = fds
        self.owner = owner

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from multiprocessing.reduction import DupFd

        return _rebuild_maps, ({k: DupFd(fd) for k, fd in self.maps.items()}, self.owner)

    def for_worker(self, index: int) -> FlowMaps:
        """The same maps, as worker `index` writes them."""
        return FlowMaps(self.maps, index)

    def close(self) -> None:
        for fd in self.maps.values():
            os.close(fd)
        self.maps = {}

    # -- flows ---------------------------------------------------------------------------

    def add(self, client: ClientFlow, peer: PeerFlow) -> None:
        """Install both directions of a bound channel (after ChannelBind succeeded and
        its permission is live)."""
        # each value starts with the other direction's key: client_value is where the
        # client's packets go (relay, peer, the interface towards the peer), peer_value
        # where the peer's go
        zero = _COUNTERS.pack(0, 0)
        client_map, peer_map = client.map_names
        to_peer = peer.key() + struct.pack("=II", peer.ifindex, self.owner)
        to_client = client.key() + struct.pack("=II", client.ifindex, self.owner)
        self._update(client_map, client.key(), to_peer.ljust(_LAYOUT[client_map][3], b"\0") + zero)
        try:
            self._update(peer_map, peer.key(), to_client.ljust(_LAYOUT[peer_map][3], b"\0") + zero)
        except OffloadError:  # never one direction alone
            self._counters(client, peer, self.lib.bpf_map_lookup_and_delete_elem)
            raise

    def remove(self, client: ClientFlow, peer: PeerFlow) -> tuple[int, int, int, int]:
        """Remove both directions; returns the last counters (packets and bytes to the
        peer, packets and bytes to the client), read and deleted in one step."""
        return self._counters(client, peer, self.lib.bpf_map_lookup_and_delete_elem)

    def counters(self, client: ClientFlow, peer: PeerFlow) -> tuple[int, int, int, int]:
        return self._counters(client, peer, self.lib.bpf_map_lookup_elem)

    def purge(self, owner: int) -> int:
        """Delete every entry `owner` installed (a worker that died left them: its
        allocations are gone); returns how many."""
        removed = 0
        for name, (size, value_size, owner_at, _) in _LAYOUT.items():
            fd = self.maps[name]
            key, nxt = ctypes.create_string_buffer(size), ctypes.create_string_buffer(size)
            value = ctypes.create_string_buffer(value_size)
            theirs = []
            first = True
            while not self.lib.bpf_map_get_next_key(fd, None if first else key, nxt):
                first = False
                ctypes.memmove(key, nxt, size)
                found = self.lib.bpf_map_lookup_elem(fd, key, value) == 0
                if found and struct.unpack_from("=I", value.raw, owner_at)[0] == owner:
                    theirs.append(key.raw)
            for raw in theirs:
                removed += self.lib.bpf_map_delete_elem(fd, ctypes.create_string_buffer(raw)) == 0
        return removed

    def _counters(
        self, client: ClientFlow, peer: PeerFlow, lookup: Any
    ) -> tuple[int, int, int, int]:
        out: list[int] = []
        for name, key in zip(client.map_names, (client.key(), peer.key()), strict=True):
            _, value_size, _, counters_at = _LAYOUT[name]
            k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value_size)
            if lookup(self.maps[name], k, v):
                out += (0, 0)  # no such flow (ENOENT)
            else:
                out += _COUNTERS.unpack_from(v.raw, counters_at)
        pp, bp, pc, bc = out
        return pp, bp, pc, bc

    def pass_reasons(self) -> dict[str, int]:
        """Packets of relayed flows passed up to user space, by reason (all CPUs)."""
        cpus = os.cpu_count() or 1
        out: dict[str, int] = {}
        for i, name in enumerate(PASS_REASONS):
            values = ctypes.create_string_buffer(8 * _possible_cpus(cpus))
            key = ctypes.c_uint32(i)
            if self.lib.bpf_map_lookup_elem(self.maps[b"pass_reasons"], ctypes.byref(key), values):
                raise _fail("pass_reasons", -1)
            raw = values.raw
            out[name] = sum(struct.unpack_from("=Q", raw, 8 * c)[0] for c in range(len(raw) // 8))
        return out

    def _update(self, name: bytes, key: bytes, value: bytes) -> None:
        k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value)
        if self.lib.bpf_map_update_elem(self.maps[name], k, v, _BPF_ANY):
            raise _fail(f"{name.decode()} update", -1)


def _rebuild_maps(fds: dict[bytes, Any], owner: int) -> FlowMaps:
    return FlowMaps({k: d.detach() for k, d in fds.items()}, owner)


class ChannelRelayProgram(FlowMaps):
    """The loaded program: its maps, the test run, the tc attachment."""

    def __init__(self, obj_path: Path) -> None:
        lib = _libbpf()
        self.obj = lib.bpf_object__open_file(str(obj_path).encode(), None)
        if not self.obj:
            raise _fail(f"cannot open {obj_path}", -1)
        ret = lib.bpf_object__load(self.obj)
        if ret:
            lib.bpf_object__close(self.obj)
            raise _fail(f"cannot load the BPF program ({privileges_missing() or NEEDS})", ret)
        prog = lib.bpf_object__find_program_by_name(self.obj, PROGRAM.encode())
        self.prog_fd = lib.bpf_program__fd(prog)
        # the object owns these descriptors (closed with it)
        fds = {
            name: lib.bpf_map__fd(lib.bpf_object__find_map_by_name(self.obj, name))
            for name in _MAPS
        }
        super().__init__(fds)
        self._attached: list[tuple[_TcHook, _TcOpts]] = []
        self._links: list[int] = []  # tcx link descriptors

    def close(self) -> None:
        self.detach()
        if self.obj:
            self.lib.bpf_object__close(self.obj)
            self.obj = None
        self.maps = {}

    # -- running it ----------------------------------------------------------------------

    def test_run(self, frame: bytes, ifindex: int = 1, gso_size: int = 0) -> tuple[int, bytes]:
        """BPF_PROG_TEST_RUN on one Ethernet frame as received on `ifindex` (as a GSO
        packet with `gso_size`): (the program's verdict, the frame as it leaves)."""
        data_in = ctypes.create_string_buffer(frame, len(frame))
        data_out = ctypes.create_string_buffer(len(frame) + 64)
        ctx = ctypes.create_string_buffer(_SK_BUFF_SIZE)
        struct.pack_into("=I", ctx, _INGRESS_IFINDEX, ifindex)
        struct.pack_into("=I", ctx, _IFINDEX, ifindex)
        if gso_size:
            struct.pack_into("=I", ctx, _GSO_SEGS, 2)
            struct.pack_into("=I", ctx, _GSO_SIZE, gso_size)
        opts = _TestRunOpts(
            sz=ctypes.sizeof(_TestRunOpts),
            data_in=ctypes.cast(data_in, ctypes.c_void_p),
            data_out=ctypes.cast(data_out, ctypes.c_void_p),
            data_size_in=len(frame),
            data_size_out=len(data_out),
            ctx_in=ctypes.cast(ctx, ctypes.c_void_p),
            ctx_size_in=_SK_BUFF_SIZE,
            repeat=1,
        )
        ret = self.lib.bpf_prog_test_run_opts(self.prog_fd, ctypes.byref(opts))
        if ret:
            raise _fail("BPF_PROG_TEST_RUN", ret)
        return ctypes.c_int32(opts.retval).value, data_out.raw[: opts.data_size_out]

    def attach(self, ifindex: int) -> None:
        """On the interface's ingress. A tcx link where the kernel has them (Linux 6.6):
        the kernel detaches the program when the link's last descriptor closes, so a
        crash or SIGKILL leaves nothing behind, and other programs on the hook (another
        server's, a CNI's) keep running. Otherwise a TC clsact filter of our own (fixed
        handle and priority): one left by a server that was killed is replaced, never
        stacked. A stale filter of ours goes first either way."""
        hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=_BPF_TC_INGRESS)
        stale = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=TC_HANDLE, priority=TC_PRIORITY)
        self.lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(stale))  # ENOENT: none
        link = self.lib.bpf_link_create(self.prog_fd, ifindex, BPF_TCX_INGRESS, None)
        if link >= 0:
            self._links.append(link)
            return
        ret = self.lib.bpf_tc_hook_create(ctypes.byref(hook))
        if ret and -ret != 17:  # EEXIST: a clsact qdisc is already there
            raise _fail(f"tc hook on ifindex {ifindex}", ret)
        opts = _TcOpts(
            sz=ctypes.sizeof(_TcOpts), prog_fd=self.prog_fd, handle=TC_HANDLE, priority=TC_PRIORITY
        )
        ret = self.lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
        if ret:
            raise _fail(f"tc attach on ifindex {ifindex}", ret)
        self._attached.append((hook, opts))

    def detach(self) -> None:
        """Off every interface it was attached to."""
        while self._links:
            os.close(self._links.pop())  # the kernel detaches with the last descriptor
        while self._attached:
            hook, tc = self._attached.pop()
            opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=tc.handle, priority=tc.priority)
            self.lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))

    @property
    def links(self) -> int:
        """How many interfaces have it through a tcx link (the rest: TC filters)."""
        return len(self._links)


def tcx_program_ids(ifindex: int) -> list[int]:
    """Ids of the programs on the interface's tcx ingress (BPF_PROG_QUERY; [] on a
    kernel without tcx). For tests and operators: `bpftool` before 7.3 does not show
    tcx attachments."""
    lib = _libbpf()
    ids = (ctypes.c_uint32 * 64)()
    count = ctypes.c_uint32(64)
    if lib.bpf_prog_query(
        ifindex, BPF_TCX_INGRESS, 0, None, ctypes.byref(ids), ctypes.byref(count)
    ):
        return []
    return list(ids[: count.value])


# struct __sk_buff (uapi/linux/bpf.h): the fields BPF_PROG_TEST_RUN takes from ctx_in
_SK_BUFF_SIZE = 192
_INGRESS_IFINDEX = 36  # after len, pkt_type, mark, queue_mapping, protocol, vlan_present,
_IFINDEX = 40  # vlan_tci, vlan_proto, priority (nine u32s)
_GSO_SEGS, _GSO_SIZE = 164, 176


def _possible_cpus(online: int) -> int:
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return online
    last = text.split(",")[-1].split("-")[-1]
    return int(last) + 1
