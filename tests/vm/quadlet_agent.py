"""The agent program of tests/vm/test_quadlet.py: Neutron 29's own ProcessManager, in the agent container.

Not a test (pytest does not collect it) and not imported by one: the test copies this file into the
agent's directory and the Quadlet unit runs it, through the `safespawn-neutron` launcher the role
wrote, with the Neutron venv's python:

    safespawn-neutron /opt/neutron-venv/bin/python quadlet_agent.py CONFIG_DIR DATA_DIR

For each network in CONFIG_DIR/networks.json it builds a ProcessManager the way Neutron's Dnsmasq
driver does (`external_process.ProcessManager(conf, net_id, namespace="qdhcp-...",
service="dnsmasq", default_cmd_callback=...)`: the class Neutron's module holds, which the launcher's
hook replaced) and calls `enable(ensure_active=True)`. Then, every second until SIGTERM, it writes
DATA_DIR/agent-view.json: what `active` and `pid` say for each network, the requests this process
sent to the channel, and what the agent sees of itself from inside the container (capabilities,
no_new_privs, pid and network namespaces, the processes it can see, sockets on its file systems).
A failure is written to DATA_DIR/agent-error.txt (the test fails at once with it).

Runs with the VM's python 3.13 in the Neutron venv: standard library and Neutron only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import time
import traceback
import warnings
from typing import Any

# Not searched for sockets: read-only copies of the host's programs and Neutron (big, and sockets
# cannot live on them), and the kernel's file systems.
NOT_WALKED = ("/proc", "/sys", "/usr", "/opt/neutron-venv")


def configure(data: str) -> Any:
    """Neutron's options as its DHCP agent registers the ones ProcessManager reads; no config files."""
    warnings.filterwarnings("ignore")  # eventlet's deprecation chatter
    from neutron.conf import common as core_conf
    from neutron.conf.agent import common as agent_conf
    from oslo_config import cfg

    conf = cfg.CONF
    for register in (core_conf.register_core_common_config_opts, agent_conf.register_external_process_opts,
                     agent_conf.register_process_monitor_opts, agent_conf.register_root_helper):
        try:
            register(conf)
        except cfg.DuplicateOptError:
            pass
    conf([], project="neutron", default_config_files=[], default_config_dirs=[])
    # The agent's state lives in its data dir (the container's root is read-only): Neutron's
    # external_pids ($state_path/external/pids) is made there by ProcessManager's constructor.
    conf.set_override("state_path", data)
    conf.set_override("root_helper", "", "AGENT")
    return conf


def dnsmasq_callback(net: dict[str, Any], data: str) -> Any:
    """The command line Neutron's Dnsmasq driver builds (docs/neutron-cmdlines.md), for one network."""
    d = os.path.join(data, net["id"])

    def callback(pid_file: str) -> list[str]:
        return ["dnsmasq", "--no-hosts", "--no-resolv", f"--pid-file={d}/pid", f"--dhcp-hostsfile={d}/host",
                f"--addn-hosts={d}/addn_hosts", f"--dhcp-optsfile={d}/opts", f"--dhcp-leasefile={d}/leases",
                "--local-service", "--bind-dynamic",
                f"--dhcp-range=set:subnet-{net['subnet']},{net['net']},static,255.255.255.0,86400s",
                "--dhcp-lease-max=256", "--conf-file=/dev/null", "--domain=openstacklocal",
                f"--interface={net['iface']}", "--no-ping"]
    return callback


def sockets_on_my_file_systems() -> list[str]:
    found = []
    for root, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in NOT_WALKED]
        for name in files:
            path = os.path.join(root, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                pass
    return found


def net_links() -> list[str]:
    """The interfaces of this process's network namespace."""
    with open("/proc/self/net/dev") as f:
        return sorted(line.split(":", 1)[0].strip() for line in f if ":" in line)


def myself() -> dict[str, Any]:
    """What the agent process sees of itself, from inside the container (read once: it cannot change)."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    return {
        "pid": os.getpid(),
        "cap_eff": status.get("CapEff"), "cap_prm": status.get("CapPrm"), "cap_bnd": status.get("CapBnd"),
        "no_new_privs": status.get("NoNewPrivs"),
        "ns_pid": os.readlink("/proc/self/ns/pid"), "ns_net": os.readlink("/proc/self/ns/net"),
        "visible_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "net_links": net_links(),
        "mounts": mounts,
        "sockets": sockets_on_my_file_systems(),
        "runtime_sockets": [p for p in ("/run/podman/podman.sock", "/var/run/docker.sock", "/run/docker.sock",
                                        "/run/containerd/containerd.sock") if os.path.exists(p)],
    }


def main() -> int:
    cfg_dir, data = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="agent: %(levelname)s %(name)s: %(message)s")

    def terminate(*_: Any) -> None:
        raise SystemExit(0)  # podman stops the container with SIGTERM; as pid 1 we must act on it

    signal.signal(signal.SIGTERM, terminate)
    t_start = time.time()
    conf = configure(data)
    from neutron.agent.linux import external_process

    cls = external_process.ProcessManager
    # The launcher's hook swapped the class in; count what this process asks the host for.
    import safespawn_neutron

    requests: list[str] = []
    submit = safespawn_neutron.client.submit

    def counting_submit(channel_dir: str, request: dict[str, Any], *a: Any, **k: Any) -> Any:
        requests.append(str(request.get("op")))
        return submit(channel_dir, request, *a, **k)

    safespawn_neutron.client.submit = counting_submit
    base = getattr(external_process, "_safespawn_original", None)
    facts = {
        "class": f"{cls.__module__}.{cls.__name__}",
        "neutron_base": f"{base.__module__}.{base.__name__}" if base else None,
        "subclass_of_neutrons": bool(base) and issubclass(cls, base),
        "channel_dir": os.environ.get("SAFESPAWN_CHANNEL_DIR"),
        "imported_in_s": round(time.time() - t_start, 1),
    }
    print("agent:", json.dumps(facts), flush=True)
    with open(os.path.join(cfg_dir, "networks.json")) as f:
        nets = json.load(f)
    me = myself()
    pms = {}
    for n in nets:
        pm = external_process.ProcessManager(conf, n["id"], namespace=n["ns"], service="dnsmasq",
                                             default_cmd_callback=dnsmasq_callback(n, data))
        t0 = time.time()
        pm.enable(ensure_active=True)
        print(f"agent: enabled {n['id']} in {time.time() - t0:.1f}s: active={pm.active} pid={pm.pid} "
              f"class={type(pm).__module__}.{type(pm).__name__}", flush=True)
        pms[n["id"]] = pm
    view_path = os.path.join(data, "agent-view.json")
    while True:
        view = {"t": time.time(), "started": t_start, "facts": facts, "self": me, "requests": list(requests),
                "nets": {k: {"active": pm.active, "pid": pm.pid, "class": type(pm).__name__}
                         for k, pm in pms.items()}}
        with open(view_path + ".tmp", "w") as f:
            json.dump(view, f)
        os.rename(view_path + ".tmp", view_path)
        time.sleep(1)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:
        err = traceback.format_exc()
        sys.stderr.write(err)
        if len(sys.argv) > 2:
            with open(os.path.join(sys.argv[2], "agent-error.txt"), "w") as f:
                f.write(err)
        sys.exit(1)
