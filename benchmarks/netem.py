"""An emulated network for local clusters: every task behind its own link of B bit/s each way.

```python
with netem.emulated(["ps-0", "worker-0", "worker-1"], rate_bit=1e9) as net:
    tf_backup.launch_local(fn, 2, hosts=net.hosts, command_prefix=net.command_prefix)
    net.counters()        # {"ps-0": Counters(tx_bytes, rx_bytes), ...}
    net.self_check("worker-1", "ps-0")
```

Layout (issue 31). One network namespace per task (`tfbnet-<pid>-<k>-<task>`) and one hub
(`tfbnet-<pid>-<k>-hub`) holding a bridge `br0`. Each task has a veth pair: `eth0` in its
namespace, with address 198.18.0.<10 + i>/24 (RFC 2544's benchmarking range), and `h<i>` in the
hub, a port of the bridge. Both ends are shaped with an HTB class of `rate_bit` (rate = ceil):
the egress of `eth0` is the task's upload, the egress of `h<i>` its download, for client and
server traffic alike. With `latency`, a netem qdisc under the task side's class delays what the
task sends by that much (one way; where the kernel has no netem, one line says so and no delay is
added). The root namespace gets no address or route in 198.18.0.0/24: only processes started
inside a task's namespace (`command_prefix`, `exec_argv`) reach the hosts.

Clean-up: `close()` deletes the namespaces (their interfaces go with them); it runs when the
`with` block ends, on an exception or KeyboardInterrupt too, and at interpreter exit (`atexit`).
Namespaces left by a run that was killed (their pid no longer runs) are deleted when the next
network is made.

Where this process is not root or `ip`/`tc` (or a bridge, or HTB) are missing, `emulated` prints
one line saying so and gives a `Loopback` network: every task on localhost, unshaped, no counters.

Counters are the kernel's interface counters of each task's `eth0`: `ip -n <ns> -s -j link`
(`counters`), or, from inside a running cluster, `/proc/<pid>/net/dev` of a task process (the
counters of that process's namespace; `proc_net_dev`): the same numbers without a subprocess.
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import threading
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

PREFIX = "tfbnet-"
SUBNET = "198.18.0"  # /24; host i is SUBNET.(FIRST_HOST + i)
FIRST_HOST = 10
MAX_TASKS = 200
TASK_IF = "eth0"  # every task's interface, inside its namespace
BRIDGE = "br0"
COMMAND_TIMEOUT = 20.0  # seconds for one ip/tc command

_lock = threading.Lock()
_serial = [0]
_open: List["Network"] = []


class Counters(NamedTuple):
    tx_bytes: int  # what the task sent
    rx_bytes: int  # what it received


class Unavailable(RuntimeError):
    """The emulation cannot be built here (not root, tools or kernel features missing)."""


# -- pure parts: names, commands, parsing (tested without root) ------------------------------------

def namespace_names(prefix: str, tasks: Sequence[str]) -> Dict[str, str]:
    """{task: namespace} plus "hub" for the bridge's namespace."""
    out = {t: f"{prefix}{t}" for t in tasks}
    out["hub"] = f"{prefix}hub"
    return out


def host_address(index: int) -> str:
    if not 0 <= index < MAX_TASKS:
        raise ValueError(f"at most {MAX_TASKS} tasks; received task index {index}")
    return f"{SUBNET}.{FIRST_HOST + index}"


def htb_commands(ns: str, dev: str, rate_bit: float, delay_s: float = 0.0) -> List[List[str]]:
    """tc commands that cap `dev`'s egress in namespace `ns` at `rate_bit` (+ a netem delay)."""
    rate = f"{int(rate_bit)}bit"
    # Burst: 1 ms at the rate, at least 64 KiB (one GSO packet). Quantum: one class only, so any
    # value that is not tiny; set to keep tc's "quantum is big" warning away.
    burst = str(max(65536, int(rate_bit / 8 / 1000)))
    cmds = [["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
            ["tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate,
             "ceil", rate, "burst", burst, "cburst", burst, "quantum", "200000"]]
    if delay_s > 0:
        cmds.append(["tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
                     "delay", f"{delay_s * 1e3:g}ms", "limit", "100000"])
    return cmds


def setup_commands(namespaces: Dict[str, str], tasks: Sequence[str], rate_bit: Optional[float],
                   delay_s: float = 0.0) -> List[List[str]]:
    """Every ip/tc command that builds the network, in order (no shaping where rate_bit is None)."""
    hub = namespaces["hub"]
    cmds = [["ip", "netns", "add", hub],
            ["ip", "-n", hub, "link", "set", "lo", "up"],
            ["ip", "-n", hub, "link", "add", BRIDGE, "type", "bridge"],
            ["ip", "-n", hub, "link", "set", BRIDGE, "up"]]
    for i, task in enumerate(tasks):
        ns, port = namespaces[task], f"h{i}"
        cmds += [["ip", "netns", "add", ns],
                 ["ip", "-n", ns, "link", "set", "lo", "up"],
                 ["ip", "-n", hub, "link", "add", port, "type", "veth", "peer", "name", TASK_IF, "netns", ns],
                 ["ip", "-n", hub, "link", "set", port, "master", BRIDGE],
                 ["ip", "-n", hub, "link", "set", port, "up"],
                 ["ip", "-n", ns, "addr", "add", f"{host_address(i)}/24", "dev", TASK_IF],
                 ["ip", "-n", ns, "link", "set", TASK_IF, "up"]]
        if rate_bit:
            cmds += htb_commands(ns, TASK_IF, rate_bit, delay_s)  # upload
            cmds += htb_commands(hub, port, rate_bit)  # download
    return cmds


def teardown_commands(namespaces: Iterable[str]) -> List[List[str]]:
    return [["ip", "netns", "delete", ns] for ns in namespaces]


def parse_link_stats(text: str) -> Counters:
    """Counters of the one link in `ip -s -j link show dev X`'s output."""
    links = json.loads(text)
    if len(links) != 1:
        raise ValueError(f"expected one link, got {len(links)}")
    stats = links[0].get("stats64") or links[0]["stats"]
    return Counters(int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"]))


def parse_proc_net_dev(text: str, dev: str = TASK_IF) -> Optional[Counters]:
    """Counters of `dev` in a /proc/net/dev text; None where it has no such interface."""
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == dev:
            fields = rest.split()
            return Counters(int(fields[8]), int(fields[0]))  # receive: bytes first; transmit: 9th field
    return None


def proc_net_dev(pid: int, dev: str = TASK_IF) -> Optional[Counters]:
    """The counters of `dev` in process `pid`'s network namespace (None: no such process or interface)."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            return parse_proc_net_dev(f.read(), dev)
    except OSError:
        return None


def stale_namespaces(names: Iterable[str], alive: Callable[[int], bool]) -> List[str]:
    """Ours (`tfbnet-<pid>-...`) whose creating process no longer runs."""
    out = []
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not alive(int(pid)):
            out.append(name)
    return out


# -- running ip/tc -------------------------------------------------------------------------------

def _run(cmd: Sequence[str], check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> List[str]:
    out = _run(["ip", "-j", "netns", "list"], check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return [n["name"] for n in json.loads(out.stdout)]


def clean_stale() -> List[str]:
    """Deletes namespaces of earlier runs that were killed; returns their names."""
    stale = stale_namespaces(list_namespaces(), _pid_alive)
    for cmd in teardown_commands(stale):
        _run(cmd, check=False)
    return stale


def unavailable_reason() -> Optional[str]:
    """Why the emulation cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not found"
    return None


# -- the networks ----------------------------------------------------------------------------------

class Loopback:
    """Every task on localhost, unshaped: what `emulated` gives where it cannot emulate."""

    shaped = False
    rate_bit = None

    def __init__(self, tasks: Sequence[str], reason: str = ""):
        self.tasks, self.reason = list(tasks), reason
        self.hosts: Dict[str, str] = {}
        self.notes: List[str] = [f"loopback, unshaped{': ' + reason if reason else ''}"]

    def command_prefix(self, task: str) -> List[str]:
        del task
        return []

    def exec_argv(self, task: str, argv: Sequence[str]) -> List[str]:
        del task
        return list(argv)

    def counters(self) -> Optional[Dict[str, Counters]]:
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Network:
    """The namespaces, veths and shaping of one emulated network (see the module docstring)."""

    shaped = True

    def __init__(self, tasks: Sequence[str], rate_bit: Optional[float], latency: float = 0.0):
        if len(set(tasks)) != len(tasks) or not tasks:
            raise ValueError(f"`tasks` must be distinct names, at least one. Received tasks={tasks!r}")
        if rate_bit is not None and not rate_bit > 0:
            raise ValueError(f"`rate_bit` must be > 0 or None. Received rate_bit={rate_bit!r}")
        self.tasks, self.rate_bit, self.latency = list(tasks), rate_bit, float(latency)
        self.notes: List[str] = []
        with _lock:
            _serial[0] += 1
            serial = _serial[0]
        self.prefix = f"{PREFIX}{os.getpid()}-{serial}-"
        self.namespaces = namespace_names(self.prefix, self.tasks)
        self.hosts = {t: host_address(i) for i, t in enumerate(self.tasks)}
        self._closed = False
        delay = self.latency
        if delay > 0 and not netem_available():
            self.notes.append(f"latency {delay * 1e3:g} ms asked for, but this kernel has no netem qdisc: "
                              "no delay added")
            print(f"netem: this kernel has no netem qdisc; latency {delay * 1e3:g} ms not emulated", flush=True)
            delay = 0.0
        _open.append(self)
        try:
            for cmd in setup_commands(self.namespaces, self.tasks, rate_bit, delay):
                _run(cmd)
        except BaseException:
            self.close()
            raise
        self.notes.insert(0, "each task in its own network namespace behind a veth to a bridge, "
                             + (f"HTB-shaped at {format_rate(rate_bit)} each way" if rate_bit else "unshaped")
                             + (f", {delay * 1e3:g} ms one-way delay on what each task sends" if delay else ""))

    def namespace(self, task: str) -> str:
        return self.namespaces[task]

    def command_prefix(self, task: str) -> List[str]:
        """argv that runs a command inside the task's namespace (`LocalCluster(command_prefix=...)`)."""
        return ["ip", "netns", "exec", self.namespaces[task]]

    def exec_argv(self, task: str, argv: Sequence[str]) -> List[str]:
        return self.command_prefix(task) + list(argv)

    def counters(self) -> Dict[str, Counters]:
        """Bytes each task's eth0 has sent and received so far."""
        return {t: parse_link_stats(_run(["ip", "-n", self.namespaces[t], "-s", "-j", "link", "show", "dev",
                                          TASK_IF]).stdout) for t in self.tasks}

    def qdiscs(self, task: str) -> str:
        """`tc -s qdisc show` of the task's eth0 and of its hub port (what is installed, with counts)."""
        i = self.tasks.index(task)
        return (_run(["tc", "-n", self.namespaces[task], "-s", "qdisc", "show", "dev", TASK_IF]).stdout
                + _run(["tc", "-n", self.namespaces["hub"], "-s", "qdisc", "show", "dev", f"h{i}"]).stdout)

    def classes(self, task: str) -> str:
        """`tc class show` of the task's eth0 (upload) and its hub port (download)."""
        i = self.tasks.index(task)
        return (_run(["tc", "-n", self.namespaces[task], "class", "show", "dev", TASK_IF]).stdout
                + _run(["tc", "-n", self.namespaces["hub"], "class", "show", "dev", f"h{i}"]).stdout)

    def transfer(self, sender: str, receiver: str, nbytes: int, timeout: float = 60.0) -> dict:
        """Sends `nbytes` over TCP from `sender`'s namespace to `receiver`'s; returns what was measured.

        Bounded: at most `nbytes` and `timeout` seconds. {"bytes": received, "seconds": from the
        accepted connection to the last byte, "goodput_bit": TCP payload rate, "sender_tx",
        "receiver_rx": the interfaces' byte counts over the transfer}.
        """
        port = 5201
        host = self.hosts[receiver]
        before = self.counters()
        recv = subprocess.Popen(self.exec_argv(receiver, [sys.executable, "-c", _RECEIVER, host, str(port),
                                                          str(nbytes), str(timeout)]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = _readline(recv, min(timeout, 30.0))
            if line.strip() != "ready":
                raise RuntimeError(f"the receiver did not start: {line!r} {recv.stderr.read() if recv.poll() is not None else ''}")
            send = _run(self.exec_argv(sender, [sys.executable, "-c", _SENDER, host, str(port), str(nbytes),
                                                str(timeout)]), check=False, timeout=timeout + 10)
            out, err = recv.communicate(timeout=timeout + 10)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait(10)
        if recv.returncode != 0 or send.returncode != 0:
            raise RuntimeError(f"transfer failed: receiver {recv.returncode} {err[-500:]}; sender "
                               f"{send.returncode} {send.stderr[-500:]}")
        result = json.loads(out.strip().splitlines()[-1])
        after = self.counters()
        result["sender_tx"] = after[sender].tx_bytes - before[sender].tx_bytes
        result["receiver_rx"] = after[receiver].rx_bytes - before[receiver].rx_bytes
        result["goodput_bit"] = 8 * result["bytes"] / result["seconds"] if result["seconds"] > 0 else float("nan")
        return result

    def self_check(self, sender: str, receiver: str, seconds: float = 2.0, timeout: float = 60.0) -> dict:
        """A transfer of about `seconds` at the set rate: measured TCP payload rate against the rate.

        Returns the transfer's figures plus "rate_bit", "wire_bit" (the receiver interface's bytes
        over the same time: payload + TCP/IP/Ethernet headers), "error" (wire rate / set rate - 1)
        and "ok" (within 10%).
        """
        if not self.rate_bit:
            raise ValueError("the network is not shaped: nothing to check")
        nbytes = int(min(self.rate_bit / 8 * seconds, 4e9))
        r = self.transfer(sender, receiver, nbytes, timeout)
        r["rate_bit"] = self.rate_bit
        r["wire_bit"] = 8 * r["receiver_rx"] / r["seconds"] if r["seconds"] > 0 else float("nan")
        r["error"] = r["wire_bit"] / self.rate_bit - 1
        r["ok"] = abs(r["error"]) <= 0.10 and r["bytes"] == nbytes
        return r

    def close(self) -> None:
        """Deletes the namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        existing = set(list_namespaces())
        for cmd in teardown_commands([ns for ns in self.namespaces.values() if ns in existing]):
            _run(cmd, check=False)
        if self in _open:
            _open.remove(self)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import select  # pylint: disable=g-import-not-at-top
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


_RECEIVER = r"""
import json, socket, sys, time
host, port, n, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(1)
s.settimeout(limit)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(limit)
buf = bytearray(1 << 22)
view = memoryview(buf)
got, start = 0, time.monotonic()
deadline = start + limit
while got < n and time.monotonic() < deadline:
    k = c.recv_into(view, min(len(buf), n - got))
    if not k:
        break
    got += k
end = time.monotonic()
c.close()
print(json.dumps({"bytes": got, "seconds": end - start}))
"""

_SENDER = r"""
import socket, sys, time
host, port, n, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = socket.create_connection((host, port), timeout=limit)
chunk = memoryview(bytes(1 << 22))
sent, deadline = 0, time.monotonic() + limit
while sent < n and time.monotonic() < deadline:
    k = c.send(chunk[:min(len(chunk), n - sent)])
    sent += k
c.close()
"""


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (tried on a veth in a scratch namespace)."""
    ns = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        return _run(["tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"],
                    check=False).returncode == 0
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
        return False
    finally:
        _run(["ip", "netns", "delete", ns], check=False)


def _probe() -> Optional[str]:
    """Why a namespace with a bridge and an HTB qdisc cannot be made here, or None."""
    ns = f"{PREFIX}{os.getpid()}-probe"
    try:
        for cmd in (["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge"],
                    ["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
                    *htb_commands(ns, "p0", 1e9)):
            proc = _run(cmd, check=False)
            if proc.returncode != 0:
                return f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[:200]}"
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        _run(["ip", "netns", "delete", ns], check=False)


def format_rate(rate_bit: Optional[float]) -> str:
    if not rate_bit:
        return "unshaped"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rate_bit >= scale:
            return f"{rate_bit / scale:g} {unit}"
    return f"{rate_bit:g} bit/s"


def emulated(tasks: Sequence[str], rate_bit: Optional[float], latency: float = 0.0):
    """A `Network` of `tasks` at `rate_bit` each way (None: namespaces, unshaped), or a `Loopback`.

    Use it as a context manager. Where the emulation cannot run here, prints one line saying why
    and returns a `Loopback` (its `notes` say so too). Deletes stale namespaces of killed runs first.
    """
    reason = unavailable_reason()
    if reason is None:
        clean_stale()
        reason = _probe()
    if reason is not None:
        print(f"netem: no emulated network ({reason}); running unshaped on loopback", flush=True)
        return Loopback(tasks, f"emulation unavailable ({reason})")
    return Network(tasks, rate_bit, latency)


@atexit.register
def _close_all() -> None:
    for net in list(_open):
        try:
            net.close()
        except Exception:  # pylint: disable=broad-except
            pass
