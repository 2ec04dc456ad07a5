"""A throw-away virtual network of Linux network namespaces ("hosts") for multi-node tests, on one machine.

`VirtualNetwork(["trainer", "inf0", "inf1"])` creates, for each host, a namespace with loopback up and one
veth whose peer is enslaved to a bridge in the root namespace; every host gets its own address on a
private /24 that no route of this machine uses, and the bridge takes `.1` so the test process can reach
the hosts too. No default route is added: nothing in the namespaces can reach beyond this machine.
`close()` (idempotent) deletes the namespaces (their veths go with them) and the bridge; names carry the
creating pid, so stale leftovers of a crashed run are recognisable and removed by the next run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

NS_PREFIX = "lct"  # namespaces: lct-<pid>-<host>; bridge: lcb<pid>; root-side veths: lcv<pid>x<i>


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, no `ip`, or the kernel/sandbox refuses)."""


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    ifname: str  # the veth inside the namespace (set GLOO_SOCKET_IFNAME to it)
    address: str

    def argv(self, *cmd: str) -> list[str]:
        """`cmd` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *cmd]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete namespaces and bridges left by earlier runs whose process is gone (ours only, by name)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"^({NS_PREFIX}-(\d+)-\S+)", line)
        if m and not _pid_alive(int(m.group(2))):
            _ip("netns", "del", m.group(1), check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        m = re.search(r"^\d+: (lcb(\d+)):", line)
        if m and not _pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that overlaps no address or route on this machine (pid-seeded)."""
    used = []
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        with contextlib.suppress(ValueError):
            first = line.split()[0] if not line.startswith(("local", "broadcast")) else line.split()[1]
            used.append(ipaddress.ip_network(first, strict=False))
    base = int(ipaddress.IPv4Address("10.200.0.0"))
    start = os.getpid() % 2048
    for k in range(2048):
        net = ipaddress.IPv4Network((base + ((start + k) % 2048) * 256, 24))
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NetnsUnavailable("no free 10.200.0.0/13 /24 subnet for the virtual network")


class VirtualNetwork:
    """Hosts (namespaces) on one bridge; use as a context manager or call `close()` yourself."""

    def __init__(self, names: list[str]) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (this test runs `ip netns add`)")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("`ip` (iproute2) is not installed")
        remove_stale()
        pid = os.getpid()
        self.bridge = f"lcb{pid}"
        self.hosts: dict[str, Host] = {}
        self._closed = False
        self.subnet = _free_subnet()
        addrs = list(self.subnet.hosts())
        self.gateway = str(addrs[0])  # the bridge's address, in the root namespace
        try:
            probe = _ip("netns", "add", f"{NS_PREFIX}-{pid}-{names[0]}", check=False)
            if probe.returncode != 0:
                raise NetnsUnavailable(f"`ip netns add` is not allowed here: {probe.stderr.strip()}")
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            for i, name in enumerate(names):
                ns = f"{NS_PREFIX}-{pid}-{name}"
                if i > 0:
                    _ip("netns", "add", ns)
                outer, inner = f"lcv{pid}x{i}", "lceth0"
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                address = str(addrs[1 + i])
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                self.hosts[name] = Host(name, ns, inner, address)
        except RuntimeError as exc:  # veth/bridge refused: the environment, not the code under test
            self.close()
            raise NetnsUnavailable(f"cannot build the virtual network: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def counters(self, name: str) -> tuple[int, int]:
        """(rx, tx) bytes of a host's veth so far: proof that traffic crossed the virtual network."""
        host = self.hosts[name]
        out = _ip("-n", host.netns, "-j", "-s", "link", "show", host.ifname).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def close(self) -> None:
        """Delete every namespace (and with it its veth) and the bridge; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        pid = os.getpid()
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            ns = line.split()[0] if line.strip() else ""
            if ns.startswith(f"{NS_PREFIX}-{pid}-"):
                _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> VirtualNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
