"""benchmarks.netem (the emulated network) and the bandwidth benchmark's models.

The pure parts run anywhere; `test_a_real_network_*` builds namespaces and needs root (CI runs as
root). No speed is asserted: rates are measured by the benchmark (its self-check), not here.
"""

import json
import os
import subprocess
import time

import pytest

from benchmarks import bandwidth
from benchmarks import netem

M = 4e7  # bytes: 1e7 float32 parameters
GBIT = 1e9


def test_bounds_and_todays_design_in_seconds():
    assert bandwidth.ps_bound(M, GBIT) == pytest.approx(0.32)
    assert bandwidth.ring_allreduce(M, GBIT, 4) == pytest.approx(0.48)  # 2 * 3/4 * M/B
    assert bandwidth.ring_allreduce(M, GBIT, 8) == pytest.approx(0.56)
    assert bandwidth.ps_link_bound(M, GBIT, 4, 1) == pytest.approx(1.28)
    assert bandwidth.ps_link_bound(M, GBIT, 4, 4) == pytest.approx(0.32)
    # (N+b) M/(P B) + M/B + M/B + max((N+b-1) M/(P B), M/B), in units of M/B = 0.32 s:
    assert bandwidth.today_step(M, GBIT, 4, 1) == pytest.approx(0.32 * (4 + 1 + 1 + 3))
    assert bandwidth.today_step(M, GBIT, 4, 2) == pytest.approx(0.32 * (2 + 1 + 1 + 1.5))
    assert bandwidth.today_step(M, GBIT, 4, 4) == pytest.approx(0.32 * (1 + 1 + 1 + 1))
    assert bandwidth.today_step(M, GBIT, 8, 4) == pytest.approx(0.32 * (2 + 1 + 1 + 1.75))
    assert bandwidth.today_step(M, 10 * GBIT, 4, 1) == pytest.approx(0.032 * 9)
    # An uneven packing: the largest shard sets the ps tasks' part.
    assert bandwidth.today_step(M, GBIT, 4, 2, largest_shard=0.9 * M) == pytest.approx(0.32 * (3.6 + 2 + 2.7))


def test_the_variants_models_drop_the_chiefs_transfers_and_halve_the_bytes():
    on_ps, bf16 = {"apply_on_ps": True}, {"apply_on_ps": True, "wire_dtype": "bfloat16"}
    # Pushes (N+b) M/(P B), no take or publish, pulls by every worker max((N+b) M/(P B), M/B).
    assert bandwidth.ours_step(M, GBIT, 4, 4, kwargs=on_ps) == pytest.approx(0.32 * (1 + 1))
    assert bandwidth.ours_step(M, GBIT, 4, 1, kwargs=on_ps) == pytest.approx(0.32 * (4 + 4))
    assert bandwidth.ours_step(M, GBIT, 4, 2, kwargs=bf16) == pytest.approx(0.16 * (2 + 2))
    assert bandwidth.ours_step(M, GBIT, 4, 1, kwargs={"wire_dtype": "float16", "apply_on_ps": False}) == (
        pytest.approx(0.16 * 9))
    got = bandwidth.ours_bytes(M, 4, [M / 2, M / 2], on_ps)
    assert got == {"chief": (M, M), "worker": (M, M), "ps-0": (2 * M, 2 * M), "ps-1": (2 * M, 2 * M)}
    assert bandwidth.ours_bytes(M, 4, [M], bf16)["ps-0"] == (2 * M, 2 * M)


def test_a_variant_applies_on_the_ps_as_the_strategy_resolves_auto():
    """apply_on_ps="auto", the default, is on for the benchmark's SGD unless a restart in place is asked for."""
    assert bandwidth.applies_on_ps(None) and bandwidth.applies_on_ps({"wire_dtype": "bfloat16"})
    assert not bandwidth.applies_on_ps({"ps_restart_timeout": 60.0})
    assert not bandwidth.applies_on_ps({"chief_rejoins": True})
    assert not bandwidth.applies_on_ps({"apply_on_ps": False})
    assert bandwidth.ours_step(M, GBIT, 4, 4) == bandwidth.ours_step(M, GBIT, 4, 4, kwargs={"apply_on_ps": True})
    assert bandwidth.ours_step(M, GBIT, 4, 4, kwargs={"ps_restart_timeout": 60.0}) == bandwidth.today_step(
        M, GBIT, 4, 4)


def test_bytes_per_step_by_role():
    ours = bandwidth.ours_bytes(M, 4, [M / 2, M / 2], {"apply_on_ps": False})
    assert ours == {"chief": (2 * M, M), "worker": (M, M), "ps-0": (2 * M, 2.5 * M), "ps-1": (2 * M, 2.5 * M)}
    # Everything sent is received by somebody: chief + 3 workers + 2 ps tasks.
    sent = ours["chief"][0] + 3 * ours["worker"][0] + 2 * ours["ps-0"][0]
    received = ours["chief"][1] + 3 * ours["worker"][1] + 2 * ours["ps-0"][1]
    assert sent == received == 9 * M
    assert bandwidth.ring_bytes(M, 4) == {"chief": (1.5 * M, 1.5 * M), "worker": (1.5 * M, 1.5 * M)}


def test_the_benchmark_model_splits_evenly_over_1_2_4_ps_whatever_its_layers():
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    for params in (1e6, 1e7, 2.5e7):
        h = mlp_task.hidden_for_params(params, bandwidth.DEPTH)
        assert abs(mlp_task.mlp_params(h, bandwidth.DEPTH) / params - 1) < 0.01
        assert sum(mlp_task.mlp_variable_sizes(h, bandwidth.DEPTH)) == mlp_task.mlp_params(h, bandwidth.DEPTH)
        for p in (1, 2, 4):
            shards = bandwidth.shard_sizes(h, p)
            assert sum(shards) == mlp_task.mlp_params(h, bandwidth.DEPTH)
            assert max(shards) / (sum(shards) / p) < 1.06  # the 40 x h first kernel: 5% at 1e6 with 4 ps
    h2 = mlp_task.hidden_for_params(1e7)
    shards = bandwidth.shard_sizes(h2, 2, depth=2)
    assert max(shards) - min(shards) <= 1  # one h x h kernel, cut in two (equal shards, tf_backup.ps.layout)


def test_variants_parse_into_strategy_and_optimizer_kwargs():
    assert bandwidth.parse_variants("") == {}
    v = bandwidth.parse_variants('{"bf16": {"wire_dtype": "bfloat16", "optimizer_kwargs": {"x": 1}}}')
    assert bandwidth.variant_cfg(v["bf16"]) == {"strategy_kwargs": {"wire_dtype": "bfloat16"},
                                                 "optimizer_kwargs": {"x": 1}}
    assert bandwidth.variant_cfg(bandwidth.DEFAULT_VARIANTS["default"]) == {}  # nothing unknown passed today
    with pytest.raises(ValueError, match="name -> kwargs"):
        bandwidth.parse_variants('["bf16"]')


def test_median_and_role_bytes():
    reps = [{"worker-0": (10, 5), "ps-0": (4, 6)}, {"worker-0": (12, 5), "ps-0": (2, 6)}, None,
            {"worker-0": (11, 7), "ps-0": (3, 9)}]
    med = bandwidth.median_net(reps)
    assert med == {"worker-0": (11, 5), "ps-0": (3, 6)}
    assert bandwidth.role_bytes({"worker-1": (2, 4), "worker-2": (4, 8), "ps-0": (1, 1)}, "worker-") == (3, 6)
    assert bandwidth.role_bytes({"ps-0": (1, 1)}, "worker-") is None


def test_setup_commands_touch_only_our_namespaces():
    names = netem.namespace_names("tfbnet-123-1-", ["ps-0", "worker-0"])
    assert names == {"ps-0": "tfbnet-123-1-ps-0", "worker-0": "tfbnet-123-1-worker-0", "hub": "tfbnet-123-1-hub"}
    cmds = netem.setup_commands(names, ["ps-0", "worker-0"], 1e9, delay_s=0.002)
    for cmd in cmds:
        # Every command creates one of our namespaces or runs inside one (`-n`): the root
        # namespace gets no interface, address or route.
        assert cmd[:3] == ["ip", "netns", "add"] and cmd[3].startswith("tfbnet-123-1-") or (
            cmd[1] == "-n" and cmd[2].startswith("tfbnet-123-1-")), cmd
    assert ["ip", "-n", "tfbnet-123-1-hub", "link", "add", "h1", "type", "veth", "peer", "name", "eth0", "netns",
            "tfbnet-123-1-worker-0"] in cmds
    assert ["ip", "-n", "tfbnet-123-1-worker-0", "addr", "add", "198.18.0.11/24", "dev", "eth0"] in cmds
    # Both ends of each veth shaped: the task's eth0 (upload, with the delay) and its hub port (download).
    assert netem.htb_commands("tfbnet-123-1-ps-0", "eth0", 1e9, 0.002) == [
        ["tc", "-n", "tfbnet-123-1-ps-0", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb",
         "default", "1"],
        ["tc", "-n", "tfbnet-123-1-ps-0", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb",
         "rate", "1000000000bit", "ceil", "1000000000bit", "burst", "125000", "cburst", "125000", "quantum", "200000"],
        ["tc", "-n", "tfbnet-123-1-ps-0", "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "10:", "netem",
         "delay", "2ms", "limit", "100000"]]
    assert netem.htb_commands("tfbnet-123-1-hub", "h0", 1e8) == [
        ["tc", "-n", "tfbnet-123-1-hub", "qdisc", "replace", "dev", "h0", "root", "handle", "1:", "htb", "default", "1"],
        ["tc", "-n", "tfbnet-123-1-hub", "class", "add", "dev", "h0", "parent", "1:", "classid", "1:1", "htb", "rate",
         "100000000bit", "ceil", "100000000bit", "burst", "65536", "cburst", "65536", "quantum", "200000"]]
    assert [c for c in cmds if c[0] == "tc" and "netem" in c] == [c for c in cmds if c[0] == "tc" and c[-2:] == [
        "limit", "100000"]]
    assert len([c for c in cmds if c[0] == "tc"]) == 2 * (2 + 2) + 2  # 2 tasks x 2 ends x (qdisc, class) + 2 delays
    unshaped = netem.setup_commands(names, ["ps-0", "worker-0"], None)
    assert not [c for c in unshaped if c[0] == "tc"]
    assert netem.teardown_commands(["tfbnet-1-1-hub"]) == [["ip", "netns", "delete", "tfbnet-1-1-hub"]]
    with pytest.raises(ValueError, match="at most 200 tasks"):
        netem.host_address(200)


def test_counters_parsing():
    link = [{"ifname": "eth0", "stats64": {"rx": {"bytes": 254, "packets": 3}, "tx": {"bytes": 90, "packets": 1}}}]
    assert netem.parse_link_stats(json.dumps(link)) == netem.Counters(tx_bytes=90, rx_bytes=254)
    with pytest.raises(ValueError, match="one link"):
        netem.parse_link_stats("[]")
    dev = ("Inter-|   Receive                                                |  Transmit\n"
           " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls "
           "carrier compressed\n"
           "    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0 "
           "      0          0\n"
           "  eth0: 5018205292 81234    0    0    0     0          0         0  3575448   40000    0    0    0     0 "
           "      0          0\n")
    assert netem.parse_proc_net_dev(dev) == netem.Counters(tx_bytes=3575448, rx_bytes=5018205292)
    assert netem.parse_proc_net_dev(dev, "lo") == netem.Counters(100, 100)
    assert netem.parse_proc_net_dev(dev, "eth1") is None
    assert netem.proc_net_dev(os.getpid(), "no-such-interface") is None


def test_stale_namespaces_are_ours_of_dead_processes():
    names = ["tfbnet-100-1-hub", "tfbnet-100-1-ps-0", "tfbnet-200-1-hub", "other-ns", "tfbnet-probe"]
    assert netem.stale_namespaces(names, lambda pid: pid == 200) == [
        "tfbnet-100-1-hub", "tfbnet-100-1-ps-0", "tfbnet-probe"]
    assert netem.format_rate(1e9) == "1 Gbit/s" and netem.format_rate(1e10) == "10 Gbit/s"
    assert netem.format_rate(2.5e8) == "250 Mbit/s" and netem.format_rate(None) == "unshaped"


def test_loopback_fallback_places_nothing():
    net = netem.Loopback(["ps-0", "worker-0"], "not root")
    assert net.hosts == {} and net.command_prefix("ps-0") == [] and net.counters() is None
    assert not net.shaped and "not root" in net.notes[0]


def _ours(prefix):
    return [n for n in netem.list_namespaces() if n.startswith(prefix)]


@pytest.mark.skipif(netem.unavailable_reason() is not None,
                    reason=f"the emulated network needs root and ip/tc: {netem.unavailable_reason()}")
def test_a_real_network_is_shaped_counts_bytes_and_leaves_nothing(tmp_path):
    own = f"{netem.PREFIX}{os.getpid()}-"
    # A namespace of a killed earlier run (pid beyond pid_max: not running) is cleaned first.
    stale = f"{netem.PREFIX}4999999-1-hub"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=20)
    with netem.emulated(["ps-0", "worker-0"], 100e6) as net:
        assert net.shaped and stale not in netem.list_namespaces()
        assert net.hosts == {"ps-0": "198.18.0.10", "worker-0": "198.18.0.11"}
        assert len(_ours(own)) == 3  # hub + 2 tasks
        for task in ("ps-0", "worker-0"):
            inside = subprocess.run(net.exec_argv(task, ["tc", "-s", "qdisc", "show", "dev", "eth0"]),
                                    capture_output=True, text=True, timeout=20, check=True).stdout
            assert "qdisc htb 1: root" in inside and "default 0x1" in inside
            classes = net.classes(task)  # upload (eth0) and download (the hub's port)
            assert classes.count("rate 100Mbit ceil 100Mbit") == 2, classes
        # The root namespace has no address or route in the emulated range.
        for cmd in (["ip", "-4", "addr", "show"], ["ip", "route", "show"]):
            assert "198.18.0." not in subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        before = net.counters()
        r = net.transfer("worker-0", "ps-0", 2_000_000, timeout=30)
        after = net.counters()
        assert r["bytes"] == 2_000_000
        # Payload plus TCP/IP headers (once per offloaded segment): a little more, never less.
        assert 2_000_000 <= r["sender_tx"] <= 2_200_000 and 2_000_000 <= r["receiver_rx"] <= 2_200_000
        assert after["worker-0"].tx_bytes - before["worker-0"].tx_bytes >= 2_000_000
        assert after["ps-0"].tx_bytes - before["ps-0"].tx_bytes < 200_000  # only ACKs back
        qdisc = net.qdiscs("ps-0")
        sent = [int(line.split()[1]) for line in qdisc.splitlines() if line.strip().startswith("Sent")]
        assert max(sent) >= 2_000_000  # the hub's port shaped ps-0's download
        # /proc/<pid>/net/dev of a process in the namespace: the same counters.
        proc = subprocess.Popen(net.exec_argv("ps-0", ["sleep", "5"]))
        try:
            for _ in range(100):  # until `ip netns exec` has exec'd sleep, inside the namespace
                with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"sleep"):
                        break
                time.sleep(0.02)
            via_proc, via_ip = netem.proc_net_dev(proc.pid), net.counters()["ps-0"]
            # The same counters (a stray IPv6 neighbour packet may pass between the two reads).
            assert via_proc is not None and abs(via_proc.rx_bytes - via_ip.rx_bytes) < 1000
            assert abs(via_proc.tx_bytes - via_ip.tx_bytes) < 1000 and via_proc.rx_bytes > 2_000_000
        finally:
            proc.kill()
            proc.wait(10)
    assert _ours(own) == []
    with pytest.raises(KeyboardInterrupt):
        with netem.emulated(["worker-0"], 1e9):
            assert len(_ours(own)) == 2
            raise KeyboardInterrupt
    assert _ours(own) == [] and not [n for n in netem.list_namespaces() if n == stale]
