#!/usr/bin/env python3
"""Record the exact command lines the REAL Neutron 29 agents produce for their side processes.

Regenerate the committed fixture with (Neutron's venv, NOT the project's venv):

    PY=$(scripts/neutron-venv) && "$PY" tests/neutron/gen_cmdlines.py tests/data/neutron_cmdlines.json

Output: a JSON list of {"case", "program", "netns", "argv", "config": {"path", "text"}|null, "launcher"}
where argv is everything after the program name and launcher is what Neutron put before it
(``ip netns exec NS env PROCESS_TAG=...``; empty for the state-change monitor, which Neutron starts
with ``[root_helper] neutron-keepalived-state-change ...`` outside any netns). config is the file
Neutron wrote for the program (haproxy -f, keepalived -f, radvd -C) as it was when it was started.

Optional: ``--signals PATH`` also writes every kill-script / signal command Neutron issued while the
cases ran (reload and disable paths) as JSON.

What runs for real (Neutron's own code):
  * dnsmasq: ``DhcpAgent.configure_dhcp_for_network`` -> ``call_driver('enable')`` -> ``Dnsmasq.enable``
    -> ``_build_cmdline_callback`` -> ``ProcessManager.enable`` -> ``IPWrapper.netns.execute``; then
    ``call_driver('reload_allocations')`` (HUP) and ``disable_dhcp_helper`` (TERM). Hosts/opts/leases
    files are written by Neutron itself.
  * haproxy (qdhcp-): ``DhcpAgent.update_isolated_metadata_proxy`` -> ``MetadataDriver.
    spawn_monitored_metadata_proxy`` (the DHCP agent's own kwargs: network_id or router_id, v6 bind).
  * haproxy (qrouter-): ``neutron.agent.metadata.driver.after_router_added`` (legacy router) and
    ``L3 AgentMixin._update_metadata_proxy`` (HA router becoming primary).
  * haproxy (ovnmeta-): ``neutron.agent.ovn.metadata.driver.MetadataDriver.spawn_monitored_metadata_proxy``
    called with exactly the arguments ``MetadataAgent.provision_datapath`` passes (namespace and veth
    names from the agent's own static helpers); the OVSDB/IDL part of provision_datapath is not run.
  * keepalived and neutron-keepalived-state-change: a real ``HaRouter`` object:
    ``set_ha_port``, ``_init_keepalived_manager``, VIPs via ``_add_gateway_vip``/``_add_vips``/
    ``add_floating_ip``/``_disable_ipv6_addressing_on_interface``/``routes_updated``,
    ``spawn_state_change_monitor``, ``enable_keepalived`` (KeepalivedManager.spawn), ``delete`` paths.
  * radvd: ``RouterInfo.enable_radvd`` -> ``ra.DaemonMonitor.enable`` (legacy and HA-primary routers).

What is stubbed, and only that:
  * process execution: ``neutron.agent.linux.utils.execute`` and ``utils.create_process`` are replaced
    by a recorder (nothing is executed). The recorder plays the started program: it writes a fake pid
    into the ProcessManager's pid file and puts the command line into a fake process table.
  * ``ProcessManager.cmdline`` (the psutil lookup behind ``active``) reads that fake process table; a
    recorded kill with 9/15/KILL/TERM removes the entry.
  * ``DeviceManager.setup/destroy/update/cleanup_stale_devices`` (plugging ports, RPC) return the real
    interface name from the real interface driver (``openvswitch``) without touching the system.
  * RPC: the DHCP agent's plugin API is a stub returning the given network; the DHCP agent object is
    created without ``__init__`` (no RPC, no threads) and given the attributes its methods read.
  * iptables (``IptablesManager.apply``), ``ip netns``/sysctl/device calls of the L3 code,
    IPv6 DAD wait (``IpAddrCommand.wait_until_address_ready``), ``netutils.is_ipv6_enabled`` (fixed
    per case so the output does not depend on this host).
  * Neutron writes into a private temporary state dir; in the output every occurrence of it is shown
    as ``/var/lib/neutron`` (the default ``state_path``), and the kill-script dir as
    ``/etc/neutron/kill_scripts`` (the default ``[AGENT] kill_scripts_path``).
  * uid/gid: Neutron puts ``os.geteuid()/getegid()`` (and the user name) into the state-change
    monitor argv and haproxy config; the generator runs as root, so those are 0 / root.
"""
import contextlib
import json
import os
import shutil
import sys
import tempfile
import uuid as uuidlib

STATE_ROOT = '/var/lib/neutron'
KILL_ROOT = '/etc/neutron/kill_scripts'
HOST = 'net-node-1'

_tmp = tempfile.mkdtemp(prefix='neutron-cmdlines-')
TMP_STATE = os.path.join(_tmp, 'state')
TMP_KILL = os.path.join(_tmp, 'kill_scripts')
os.makedirs(TMP_STATE)
os.makedirs(TMP_KILL)

from neutron_conf import register_agent_options  # noqa: E402  (first: it quiets the import warnings)
from oslo_utils import netutils  # noqa: E402

from neutron.conf.agent import common as agent_conf  # noqa: E402

CONF = register_agent_options()

CONF.set_override('state_path', TMP_STATE)
CONF.set_override('host', HOST)
CONF.set_override('root_helper', '', 'AGENT')
CONF.set_override('kill_scripts_path', TMP_KILL, 'AGENT')
CONF.set_override('check_child_processes_interval', 0, 'AGENT')
CONF.set_override('interface_driver', 'openvswitch')

import neutron.privileged  # noqa: E402,F401
from neutron import privileged  # noqa: E402
privileged.default.set_client_mode(False)
for _ctx in ('dhcp_release_cmd', 'namespace_cmd', 'link_cmd', 'default'):
    if hasattr(privileged, _ctx):
        getattr(privileged, _ctx).set_client_mode(False)

from neutron_lib import constants as n_const  # noqa: E402

from neutron.agent.common import utils as agent_common_utils  # noqa: E402
from neutron.agent.dhcp import agent as dhcp_agent  # noqa: E402
from neutron.agent.l3 import ha as l3_ha  # noqa: E402
from neutron.agent.l3 import ha_router  # noqa: E402
from neutron.agent.l3 import legacy_router  # noqa: E402
from neutron.agent.linux import dhcp  # noqa: E402
from neutron.agent.linux import external_process  # noqa: E402
from neutron.agent.linux import interface  # noqa: E402
from neutron.agent.linux import ip_lib  # noqa: E402
from neutron.agent.linux import iptables_manager  # noqa: E402
from neutron.agent.linux import keepalived  # noqa: E402
from neutron.agent.linux import ra  # noqa: E402
from neutron.agent.linux import utils as linux_utils  # noqa: E402
from neutron.agent.metadata import driver as metadata_driver  # noqa: E402
from neutron.common import utils as common_utils  # noqa: E402

try:  # the OVN metadata agent pulls in ovsdbapp; optional
    from neutron.agent.ovn.metadata import agent as ovn_meta_agent
    from neutron.agent.ovn.metadata import driver as ovn_meta_driver
except Exception as exc:  # pragma: no cover
    print('OVN metadata driver not importable: %s' % exc, file=sys.stderr)
    ovn_meta_agent = ovn_meta_driver = None

# ---------------------------------------------------------------------------------------------------
# Recorder: the only stand-in for "running a program".
# ---------------------------------------------------------------------------------------------------
PROGRAMS = ('dnsmasq', 'haproxy', 'keepalived', 'neutron-keepalived-state-change', 'radvd')
FAKE_PROCS = {}            # pid -> cmdline string (what psutil would report)
NEXT_PID = [40000]
SPAWNS = []                # raw spawn records
SIGNALS = []               # raw kill-script records
PROBES = []                # capability probes (program --test / --version)
OTHER = []                 # any other command Neutron tried to run (namespaces, sysctl, ...)
CURRENT_PM = []            # stack of ProcessManagers inside enable()/disable()
CASE = [None]


def _split_launcher(cmd):
    cmd = [str(c) for c in cmd]
    netns = None
    i = 0
    if cmd[:3] == ['ip', 'netns', 'exec']:
        netns = cmd[3]
        i = 4
    env = {}
    if i < len(cmd) and cmd[i] == 'env':
        i += 1
        while i < len(cmd) and '=' in cmd[i] and not cmd[i].startswith('-'):
            k, v = cmd[i].split('=', 1)
            env[k] = v
            i += 1
    return netns, env, cmd[:i], cmd[i:]


def _record(cmd, async_=False):
    netns, env, launcher, rest = _split_launcher(cmd)
    prog = os.path.basename(rest[0]) if rest else ''
    if prog in PROGRAMS and ('--test' in rest or '--version' in rest):
        # Capability probes Neutron runs through the same PATH lookup (no netns):
        # dnsmasq --test --dhcp-host=tag:foo, keepalived --version. Answer as Debian 12's binaries.
        PROBES.append({'case': CASE[0], 'cmd': list(map(str, cmd)), 'env': env})
        if prog == 'keepalived':
            return '', 'Keepalived v2.2.7 (01/16,2022)\n'
        return 'dnsmasq: syntax check OK.\n', ''
    if prog in PROGRAMS:
        pm = CURRENT_PM[-1] if CURRENT_PM else None
        pid = NEXT_PID[0]
        NEXT_PID[0] += 1
        FAKE_PROCS[pid] = ' '.join(rest)
        if pm is not None:  # the program writes its pid file (the one Neutron will read)
            with open(pm.get_pid_file_name(), 'w') as f:
                f.write(str(pid))
        SPAWNS.append({'case': CASE[0], 'cmd': list(map(str, cmd)), 'netns': netns, 'env': env,
                       'launcher': launcher, 'program': prog, 'argv': rest[1:], 'async': async_,
                       'service': getattr(pm, 'service', None)})
        return '', ''
    if prog.endswith('-kill') or prog == 'kill':
        if prog == 'kill':
            sig, pid = rest[1].lstrip('-'), rest[2]
        else:
            sig, pid = rest[1], rest[2]
        SIGNALS.append({'case': CASE[0], 'netns': netns, 'env': env, 'cmd': list(map(str, cmd)),
                        'kill_script': prog, 'signal': str(sig), 'pid': str(pid)})
        if str(sig) in ('9', '15', 'KILL', 'TERM'):
            FAKE_PROCS.pop(int(pid), None)
        return '', ''
    OTHER.append({'case': CASE[0], 'cmd': list(map(str, cmd))})
    return '', ''


def fake_execute(cmd, process_input=None, addl_env=None, check_exit_code=True,
                 return_stderr=False, log_fail_as_error=True, extra_ok_codes=None,
                 run_as_root=False, privsep_exec=False):
    if addl_env:
        cmd = linux_utils.addl_env_args(addl_env) + list(cmd)
    out, err = _record(cmd)
    return (out, err) if return_stderr else out


class _FakePopen:
    pid = 0
    returncode = None

    def poll(self):
        return None


def fake_create_process(cmd, run_as_root=False, addl_env=None):
    cmd = list(map(str, linux_utils.addl_env_args(addl_env) + list(cmd)))
    if run_as_root:
        cmd = linux_utils.shlex.split(agent_conf.get_root_helper(CONF)) + cmd
    _record(cmd, async_=True)
    return _FakePopen(), cmd


linux_utils.execute = fake_execute
linux_utils.create_process = fake_create_process
agent_common_utils.execute = fake_execute          # ip_lib uses neutron.agent.common.utils.execute
agent_common_utils.create_process = fake_create_process


def _fake_cmdline(self):
    pid = self.pid
    if not pid:
        return None
    return FAKE_PROCS.get(pid)


external_process.ProcessManager.cmdline = property(_fake_cmdline)
_orig_enable = external_process.ProcessManager.enable
_orig_disable = external_process.ProcessManager.disable


def _enable(self, *a, **k):
    CURRENT_PM.append(self)
    try:
        return _orig_enable(self, *a, **k)
    finally:
        CURRENT_PM.pop()


external_process.ProcessManager.enable = _enable

# Kill scripts exist (ProcessManager.get_kill_cmd only uses them when the file exists).
for _svc in ('dnsmasq', 'haproxy', 'keepalived', 'radvd',
             'neutron-keepalived-state-change-monitor', 'default-service'):
    _p = os.path.join(TMP_KILL, '%s-kill' % _svc)
    with open(_p, 'w') as _f:
        _f.write('#!/bin/sh\nexit 0\n')
    os.chmod(_p, 0o755)

# ---- stubs for system effects that are not process spawns -----------------------------------------
IPV6_ENABLED = [True]
netutils.is_ipv6_enabled = lambda: IPV6_ENABLED[0]
iptables_manager.IptablesManager.apply = lambda self: None
ip_lib.IpAddrCommand.wait_until_address_ready = lambda self, address, **kw: None


def _dm_setup(self, network, segment=None):
    # Real naming: the DHCP port on this host, named by the real interface driver.
    device_id = self.get_device_id(network, segment)
    for port in network.ports:
        if port.device_id == device_id:
            cidrs = {s.id: s.cidr.split('/')[1] for s in network.subnets}
            DHCP_DEVICE_IPS[network.namespace] = ['%s/%s' % (f.ip_address, cidrs[f.subnet_id])
                                                  for f in port.fixed_ips]
            return self.get_interface_name(network, port)
    raise RuntimeError('no DHCP port for %s' % network.id)


dhcp.DeviceManager.setup = _dm_setup
dhcp.DeviceManager.destroy = lambda self, network, device_name, segment=None: None
dhcp.DeviceManager.update = lambda self, network, device_name: None
dhcp.DeviceManager.cleanup_stale_devices = lambda self, network, dhcp_port=None: None
DHCP_DEVICE_IPS = {}  # namespace -> addresses DeviceManager.setup would have put on the DHCP tap


class _DhcpIpLib:
    """dhcp's view of ip_lib: device address listing and namespace deletion are fake."""

    @staticmethod
    def get_devices_with_ip(namespace, name=None, **kwargs):
        return [{'name': name, 'cidr': c} for c in DHCP_DEVICE_IPS.get(namespace, [])]

    @staticmethod
    def delete_network_namespace(*a, **k):
        return None

    def __getattr__(self, name):
        return getattr(ip_lib, name)


dhcp.ip_lib = _DhcpIpLib()
# Lease release on reload uses dhcp_release; no leases to release in these cases.
dhcp.Dnsmasq._release_unused_leases = lambda self: None


class _FakeLink:
    def __init__(self, mac):
        self.address = mac


class _FakeAddr:
    def flush(self, *a, **k):
        pass

    def list(self, *a, **k):
        return []


class _FakeIPDevice:
    MACS = {}

    def __init__(self, name, namespace=None):
        self.name = name
        self.link = _FakeLink(self.MACS.get(name, 'fa:16:3e:00:00:01'))
        self.addr = _FakeAddr()


class _HaRouterIpLib:
    """ha_router's view of ip_lib: IPDevice (reads the MAC, flushes addresses) is fake."""
    IPDevice = _FakeIPDevice

    def __getattr__(self, name):
        return getattr(ip_lib, name)


ha_router.ip_lib = _HaRouterIpLib()

# ---------------------------------------------------------------------------------------------------
# Helpers to build the model objects Neutron uses.
# ---------------------------------------------------------------------------------------------------


def uid(n):
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, 'safespawn-%s' % n))


def mac(n):
    return 'fa:16:3e:%02x:%02x:%02x' % ((n >> 16) & 255, (n >> 8) & 255, n & 255)


def subnet(name, net_id, cidr, ip_version=4, gateway=None, enable_dhcp=True, dns=(), routes=(),
           addr_mode=None, ra_mode=None):
    return dhcp.DictModel(id=uid(name), network_id=net_id, name=name, cidr=cidr,
                          ip_version=ip_version, gateway_ip=gateway, enable_dhcp=enable_dhcp,
                          dns_nameservers=list(dns), host_routes=list(routes),
                          ipv6_address_mode=addr_mode, ipv6_ra_mode=ra_mode,
                          subnetpool_id=None, segment_id=None)


def port(name, net_id, fixed, owner='compute:nova', device_id=None, n=1, extra_opts=(),
         dns_name=''):
    fixed_ips = [dhcp.DictModel(subnet_id=s.id, ip_address=ip) for s, ip in fixed]
    return dhcp.DictModel(id=uid(name), network_id=net_id, mac_address=mac(n),
                          fixed_ips=fixed_ips, device_owner=owner,
                          device_id=device_id or uid(name + '-dev'), admin_state_up=True,
                          extra_dhcp_opts=[dhcp.DictModel(o) for o in extra_opts],
                          dns_assignment=[dhcp.DictModel(hostname='host-%s' % ip.replace('.', '-')
                                                         .replace(':', '-'), ip_address=ip,
                                                         fqdn='host-%s.openstacklocal.' % ip
                                                         .replace('.', '-').replace(':', '-'))
                                          for _s, ip in fixed],
                          dns_name=dns_name)


def network(name, subnets_ports, mtu=1450):
    net_id = uid(name)
    subnets, ports = subnets_ports(net_id)
    return dhcp.NetModel(id=net_id, name=name, admin_state_up=True, mtu=mtu,
                         subnets=subnets, non_local_subnets=[], ports=ports, segments=[],
                         project_id=uid('project'), tenant_id=uid('project'))


def dhcp_port(net_id, fixed, n=250):
    return port('dhcp-port-%s' % net_id, net_id, fixed, owner=n_const.DEVICE_OWNER_DHCP,
                device_id=common_utils.get_dhcp_agent_device_id(net_id, HOST), n=n)


# ---------------------------------------------------------------------------------------------------
# Case runners
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def case(name, overrides=None, ipv6=True):
    CASE[0] = name
    IPV6_ENABLED[0] = ipv6
    overrides = overrides or {}
    for key, value in overrides.items():
        group = None
        if '.' in key:
            group, key = key.split('.', 1)
        CONF.set_override(key, value, group)
    try:
        yield
    finally:
        for key in overrides:
            group = None
            if '.' in key:
                group, key = key.split('.', 1)
            CONF.clear_override(key, group)
        CASE[0] = None
        IPV6_ENABLED[0] = True


class _PluginStub:
    """Stands in for the DHCP agent's RPC API (DhcpPluginApi)."""

    def __init__(self):
        self.networks = {}

    def get_networks(self, *a, **k):
        return list(self.networks.values())

    def get_ports(self, *a, **k):
        return []  # no OVN metadata ports on these networks

    def get_network_info(self, network_id):
        return self.networks.get(network_id)


def make_dhcp_agent():
    """A DhcpAgent whose methods are the real ones; __init__ (RPC, threads) is skipped."""
    agent = object.__new__(dhcp_agent.DhcpAgent)
    agent.conf = CONF
    agent.cache = dhcp_agent.NetworkCache()
    agent.dhcp_driver_cls = dhcp.Dnsmasq
    agent.dhcp_version = None
    agent.plugin_rpc = _PluginStub()
    agent._process_monitor = external_process.ProcessMonitor(config=CONF, resource_type='dhcp')
    agent._metadata_routers = {}
    agent.restarted_metadata_proxy_set = set()
    agent._network_bulk_allocations = {}
    agent.dhcp_ready_ports = set()
    agent.dhcp_prio_ready_ports = set()
    def schedule_resync(reason, network_id=None):  # the real one hides driver errors for a retry
        raise RuntimeError('DHCP driver failed for %s: %s' % (network_id, reason))
    agent.schedule_resync = schedule_resync
    agent.safe_get_network_info = lambda network_id: agent.plugin_rpc.get_network_info(network_id)
    return agent


def run_dhcp(name, net, overrides=None, reload=True, teardown=True):
    with case(name, overrides):
        agent = make_dhcp_agent()
        agent.plugin_rpc.networks[net.id] = net
        agent.configure_dhcp_for_network(net)
        if reload:
            agent.call_driver('reload_allocations', net)
        if teardown:
            agent.disable_dhcp_helper(net.id)


def ipv4_net(name, n_subnets=1, dns=(), extra_opts=(), isolated=True, gw=True):
    def build(net_id):
        subnets = []
        fixed_dhcp = []
        ports = []
        for i in range(n_subnets):
            s = subnet('%s-v4-%d' % (name, i), net_id, '10.%d.%d.0/24' % (10 + i, 1),
                       gateway='10.%d.%d.1' % (10 + i, 1) if gw else None, dns=dns,
                       routes=[{'destination': '192.168.50.0/24',
                                'nexthop': '10.%d.1.254' % (10 + i)}] if i == 0 else [])
            subnets.append(s)
            fixed_dhcp.append((s, '10.%d.1.2' % (10 + i)))
            ports.append(port('%s-vm-%d' % (name, i), net_id, [(s, '10.%d.1.10' % (10 + i))],
                              n=10 + i, extra_opts=extra_opts if i == 0 else ()))
        ports.append(dhcp_port(net_id, fixed_dhcp))
        if not isolated:
            ports.append(port('%s-router' % name, net_id, [(subnets[0], '10.10.1.1')],
                              owner=n_const.DEVICE_OWNER_ROUTER_INTF, device_id=uid('router-' + name),
                              n=5))
        return subnets, ports
    return network(name, build)


def ipv6_net(name, addr_mode, ra_mode, dns=(), with_v4=False, prefix='fd00:%x::/64', idx=1,
             router=False):
    def build(net_id):
        subnets, fixed_dhcp, ports = [], [], []
        s6 = subnet('%s-v6' % name, net_id, prefix % idx, ip_version=6,
                    gateway=(prefix % idx).replace('::/64', '::1'), dns=dns,
                    addr_mode=addr_mode, ra_mode=ra_mode)
        subnets.append(s6)
        v6_dhcp_ip = (prefix % idx).replace('::/64', '::2')
        v6_vm_ip = (prefix % idx).replace('::/64', '::10')
        fixed_vm = [(s6, v6_vm_ip)]
        if addr_mode != n_const.IPV6_SLAAC:
            fixed_dhcp.append((s6, v6_dhcp_ip))
        else:
            fixed_dhcp.append((s6, v6_dhcp_ip))
        if with_v4:
            s4 = subnet('%s-v4' % name, net_id, '10.60.0.0/24', gateway='10.60.0.1', dns=dns)
            subnets.insert(0, s4)
            fixed_dhcp.insert(0, (s4, '10.60.0.2'))
            fixed_vm.insert(0, (s4, '10.60.0.10'))
        ports.append(port('%s-vm' % name, net_id, fixed_vm, n=40 + idx))
        ports.append(dhcp_port(net_id, fixed_dhcp, n=240 + idx))
        if router:
            ports.append(port('%s-router' % name, net_id, [(subnets[0], '10.60.0.1')],
                              owner=n_const.DEVICE_OWNER_ROUTER_INTF, device_id=uid('router-' + name),
                              n=6))
        return subnets, ports
    return network(name, build)


def dhcp_cases():
    run_dhcp('dhcp-ipv4-basic', ipv4_net('net-v4'))
    run_dhcp('dhcp-ipv4-three-subnets-dns-domain-extra-opts',
             ipv4_net('net-v4-multi', n_subnets=3, dns=['8.8.8.8', '1.1.1.1'],
                      extra_opts=[{'opt_name': 'bootfile-name', 'opt_value': 'pxelinux.0',
                                   'ip_version': 4},
                                  {'opt_name': 'tftp-server', 'opt_value': '10.10.1.200',
                                   'ip_version': 4},
                                  {'opt_name': '26', 'opt_value': '1400', 'ip_version': 4}]),
             overrides={'dns_domain': 'example.org', 'dnsmasq_dns_servers': ['9.9.9.9', '149.112.112.112'],
                        'dhcp_lease_duration': -1, 'dhcp_renewal_time': 600,
                        'dhcp_rebinding_time': 900, 'dhcp_broadcast_reply': True,
                        'dnsmasq_lease_max': 4096})
    run_dhcp('dhcp-ipv4-conf-file-txt-record-log-dir',
             ipv4_net('net-v4-conf'),
             overrides={'dnsmasq_config_file': '/etc/neutron/dnsmasq-neutron.conf',
                        'dnsmasq_txt_record': 'neutron-dhcp-agent',
                        'dnsmasq_base_log_dir': os.path.join(TMP_STATE, 'dnsmasq-log'),
                        'dhcp_lease_duration': 3600})
    run_dhcp('dhcp-ipv4-local-resolv-empty-arg', ipv4_net('net-v4-localresolv'),
             overrides={'dnsmasq_local_resolv': True})
    for mode in (n_const.IPV6_SLAAC, n_const.DHCPV6_STATEFUL, n_const.DHCPV6_STATELESS):
        run_dhcp('dhcp-ipv6-%s' % mode,
                 ipv6_net('net-v6-%s' % mode, mode, mode, dns=['fd00:53::53'],
                          idx={'slaac': 1, 'dhcpv6-stateful': 2, 'dhcpv6-stateless': 3}[mode]))
    run_dhcp('dhcp-ipv6-no-modes-legacy-static', ipv6_net('net-v6-nomode', None, None, idx=4))
    run_dhcp('dhcp-dual-stack-stateful',
             ipv6_net('net-dual', n_const.DHCPV6_STATEFUL, n_const.DHCPV6_STATEFUL, with_v4=True,
                      dns=['10.0.0.53', 'fd00:53::53'], idx=5),
             overrides={'dns_domain': 'cloud.example.com'})
    # Isolated metadata in qdhcp- (IPv4 only: 169.254.169.254; dual stack: also fe80::a9fe:a9fe on the tap)
    run_dhcp('dhcp-isolated-metadata-ipv4', ipv4_net('net-meta-v4'),
             overrides={'enable_isolated_metadata': True})
    run_dhcp('dhcp-isolated-metadata-dual-stack',
             ipv6_net('net-meta-dual', n_const.IPV6_SLAAC, n_const.IPV6_SLAAC, with_v4=True, idx=6),
             overrides={'enable_isolated_metadata': True})
    run_dhcp('dhcp-force-metadata-ovs-veth', ipv4_net('net-force-meta', isolated=False),
             overrides={'force_metadata': True, 'ovs_use_veth': True})
    # enable_metadata_network: a 169.254.x subnet with a router port -> proxy keyed by router_id
    def build_meta_net(net_id):
        s = subnet('metanet-v4', net_id, '169.254.169.0/24', gateway='169.254.169.1')
        ports = [dhcp_port(net_id, [(s, '169.254.169.2')]),
                 port('metanet-router', net_id, [(s, '169.254.169.1')],
                      owner=n_const.DEVICE_OWNER_ROUTER_INTF, device_id=uid('router-metanet'), n=7)]
        return [s], ports
    run_dhcp('dhcp-metadata-network-router-id', network('net-metadata-network', build_meta_net),
             overrides={'enable_isolated_metadata': True, 'enable_metadata_network': True})
    # Every in-tree interface driver is "bridged"; out-of-tree drivers (e.g. networking-calico) are
    # not, and then Dnsmasq adds --bridge-interface=IFACE,tap*. Shown by flipping the property.
    orig_bridged = interface.LinuxInterfaceDriver.bridged
    interface.LinuxInterfaceDriver.bridged = property(lambda self: False)
    try:
        run_dhcp('dhcp-ipv4-non-bridged-driver', ipv4_net('net-v4-nonbridged'))
    finally:
        interface.LinuxInterfaceDriver.bridged = orig_bridged
    run_dhcp('dhcp-isolated-metadata-debug-rate-limit', ipv4_net('net-meta-rl'),
             overrides={'enable_isolated_metadata': True, 'debug': True,
                        'metadata_rate_limiting.rate_limit_enabled': True,
                        'metadata_rate_limiting.ip_versions': [4],
                        'metadata_proxy_user': 'nobody', 'metadata_proxy_group': 'nogroup'})


# ---- L3 -----------------------------------------------------------------------------------------


class _L3AgentStub:
    """The attributes of L3NATAgent that the metadata callbacks and AgentMixin read."""

    def __init__(self):
        self.conf = CONF
        self.process_monitor = external_process.ProcessMonitor(config=CONF, resource_type='router')
        self.metadata_driver = metadata_driver.MetadataDriver()
        self.metadata_driver.metadata_port = CONF.metadata_port
        self.metadata_driver.metadata_access_mark = CONF.metadata_access_mark


def router_dict(name, internal, gw=None, fips=(), ha=False, vr_id=1, routes=()):
    r = {'id': uid(name), 'name': name, 'admin_state_up': True, 'distributed': False,
         'ha': ha, 'routes': list(routes), 'enable_snat': True,
         n_const.INTERFACE_KEY: internal, n_const.FLOATINGIP_KEY: list(fips)}
    if gw:
        r['gw_port'] = gw
        r['external_gateway_info'] = {'network_id': gw['network_id']}
    if ha:
        r['ha_vr_id'] = vr_id
        r['priority'] = 50
        r['_ha_state'] = 'standby'
        r[n_const.HA_INTERFACE_KEY] = {
            'id': uid(name + '-ha-port'), 'network_id': uid('ha-net'), 'mac_address': mac(900 + vr_id),
            'status': n_const.PORT_STATUS_ACTIVE, 'mtu': 1450,
            'fixed_ips': [{'subnet_id': uid('ha-subnet'), 'ip_address': '169.254.192.%d' % (10 + vr_id),
                           'prefixlen': 18}],
            'subnets': [{'id': uid('ha-subnet'), 'cidr': '169.254.192.0/18', 'gateway_ip': None}]}
    return r


def rport(name, net, ips, subnets, n, ra_mode=None, mtu=1450):
    return {'id': uid(name), 'network_id': uid(net), 'mac_address': mac(n), 'mtu': mtu,
            'fixed_ips': [{'subnet_id': uid(s['cidr']), 'ip_address': ip,
                           'prefixlen': int(s['cidr'].split('/')[1])} for ip, s in zip(ips, subnets)],
            'subnets': [dict(id=uid(s['cidr']), cidr=s['cidr'], gateway_ip=s.get('gateway_ip'),
                             ipv6_ra_mode=s.get('ipv6_ra_mode'),
                             ipv6_address_mode=s.get('ipv6_address_mode'),
                             dns_nameservers=s.get('dns_nameservers', []))
                        for s in subnets],
            'extra_subnets': [], 'address_scopes': {'4': None, '6': None}}


def _driver():
    return interface.OVSInterfaceDriver(CONF)


def legacy_router_case(name, router, ipv6=True, overrides=None):
    with case(name, overrides, ipv6=ipv6):
        agent = _L3AgentStub()
        ri = legacy_router.LegacyRouter(agent, router['id'], router, CONF, _driver(), use_ipv6=True)
        ri.router_namespace.create = lambda *a, **k: None
        ri.initialize(agent.process_monitor)  # creates ri.radvd (ra.DaemonMonitor)
        ri.internal_ports = list(router[n_const.INTERFACE_KEY])
        payload = type('P', (), {'latest_state': ri})()
        metadata_driver.after_router_added(None, None, agent, payload)
        ri.enable_radvd(ri.internal_ports)
        # a second enable (port change): ProcessManager.enable(reload_cfg=True) -> HUP
        ri.enable_radvd(ri.internal_ports)
        ri.disable_radvd()
        payload = type('P', (), {'latest_state': ri})()
        metadata_driver.before_router_removed(None, None, agent, payload)


def ha_router_case(name, router, ipv6=True, overrides=None, primary=True):
    with case(name, overrides, ipv6=ipv6):
        agent = _L3AgentStub()
        ri = ha_router.HaRouter(agent, router['id'], router, CONF, _driver(), use_ipv6=True)
        ri.process_monitor = agent.process_monitor
        ri.radvd = ra.DaemonMonitor(ri.router_id, ri.ns_name, agent.process_monitor,
                                    ri.get_internal_device_name, CONF)
        ri.set_ha_port()
        ri._init_keepalived_manager(agent.process_monitor)
        # (HaRouter.initialize would also create the namespace and plug the HA port: system effects.)
        ri.spawn_state_change_monitor(agent.process_monitor)
        gw = router.get('gw_port')
        if gw:
            gw_if = ri.get_external_device_name(gw['id'])
            ri.ex_gw_port = gw
            ri._add_gateway_vip(gw, gw_if)
            _FakeIPDevice.MACS[gw_if] = gw['mac_address']
            for fip in router.get(n_const.FLOATINGIP_KEY, []):
                ri.add_floating_ip(fip, gw_if, None)
        for p in router[n_const.INTERFACE_KEY]:
            qr = ri.get_internal_device_name(p['id'])
            _FakeIPDevice.MACS[qr] = p['mac_address']
            ri._add_vips(p, qr)
            ri._disable_ipv6_addressing_on_interface(qr)
        ri.internal_ports = list(router[n_const.INTERFACE_KEY])
        ri.enable_keepalived()  # first: spawn
        if router.get('routes'):
            ri.routes_updated([], router['routes'])  # reload_cfg -> HUP
        if primary:
            # keepalived-state-change reports "primary": the L3 agent spawns haproxy and radvd.
            ri.ha_state = 'primary'
            mixin = object.__new__(l3_ha.AgentMixin)
            mixin.conf = CONF
            mixin.process_monitor = agent.process_monitor
            mixin.metadata_driver = agent.metadata_driver
            mixin._update_metadata_proxy(ri, ri.router_id, 'primary')
            mixin._update_radvd_daemon(ri, 'primary')
            mixin._update_radvd_daemon(ri, 'backup')
            mixin._update_metadata_proxy(ri, ri.router_id, 'backup')
        ri.destroy_state_change_monitor(agent.process_monitor)
        ri.disable_keepalived()


def l3_cases():
    ext = {'cidr': '203.0.113.0/24', 'gateway_ip': '203.0.113.1'}
    ext6 = {'cidr': '2001:db8:ffff::/64', 'gateway_ip': '2001:db8:ffff::1',
            'ipv6_ra_mode': None, 'ipv6_address_mode': None}
    v4a = {'cidr': '10.10.1.0/24', 'gateway_ip': '10.10.1.1'}
    v4b = {'cidr': '10.20.1.0/24', 'gateway_ip': '10.20.1.1'}
    slaac = {'cidr': '2001:db8:1::/64', 'gateway_ip': '2001:db8:1::1', 'ipv6_ra_mode': 'slaac',
             'ipv6_address_mode': 'slaac', 'dns_nameservers': ['2001:db8::53', '2001:db8::54']}
    stateful = {'cidr': '2001:db8:2::/64', 'gateway_ip': '2001:db8:2::1',
                'ipv6_ra_mode': 'dhcpv6-stateful', 'ipv6_address_mode': 'dhcpv6-stateful'}
    stateless = {'cidr': '2001:db8:3::/64', 'gateway_ip': '2001:db8:3::1',
                 'ipv6_ra_mode': 'dhcpv6-stateless', 'ipv6_address_mode': 'dhcpv6-stateless'}

    def gw_port(name, n, v6=False):
        subs = [ext] + ([ext6] if v6 else [])
        ips = ['203.0.113.%d' % (10 + n)] + (['2001:db8:ffff::%x' % (10 + n)] if v6 else [])
        return rport(name, 'ext-net', ips, subs, 500 + n)

    legacy_router_case('l3-legacy-ipv4-metadata', router_dict(
        'r-legacy-v4', [rport('r-legacy-v4-qr', 'net-a', ['10.10.1.1'], [v4a], 600)],
        gw=gw_port('r-legacy-v4-gw', 1)))
    legacy_router_case('l3-legacy-ipv4-metadata-host-without-ipv6', router_dict(
        'r-legacy-nov6', [rport('r-legacy-nov6-qr', 'net-a', ['10.10.1.1'], [v4a], 601)]),
        ipv6=False)
    legacy_router_case('l3-legacy-ipv6-radvd-all-modes', router_dict(
        'r-legacy-v6', [
            rport('r-legacy-v6-qr1', 'net-s', ['2001:db8:1::1'], [slaac], 610),
            rport('r-legacy-v6-qr2', 'net-f', ['2001:db8:2::1'], [stateful], 611),
            rport('r-legacy-v6-qr3', 'net-l', ['2001:db8:3::1'], [stateless], 612),
            rport('r-legacy-dual-qr4', 'net-d', ['10.20.1.1', '2001:db8:1::2'], [v4b, slaac], 613,
                  mtu=9000),
        ], gw=gw_port('r-legacy-v6-gw', 2, v6=True)),
        overrides={'radvd_user': 'neutron', 'min_rtr_adv_interval': 10,
                   'max_rtr_adv_interval': 30})
    legacy_router_case('l3-legacy-radvd-user-root-debug', router_dict(
        'r-legacy-root', [rport('r-legacy-root-qr', 'net-s', ['2001:db8:1::1'], [slaac], 620)]),
        overrides={'radvd_user': 'root', 'debug': True})

    ha_router_case('l3-ha-ipv4-vips-fips-routes', router_dict(
        'r-ha-1', [rport('r-ha-1-qr1', 'net-a', ['10.10.1.1'], [v4a], 700),
                   rport('r-ha-1-qr2', 'net-b', ['10.20.1.1'], [v4b], 701)],
        gw=gw_port('r-ha-1-gw', 3),
        fips=[{'id': uid('fip1'), 'floating_ip_address': '203.0.113.50', 'fixed_ip_address': '10.10.1.10'},
              {'id': uid('fip2'), 'floating_ip_address': '203.0.113.51', 'fixed_ip_address': '10.20.1.10'}],
        ha=True, vr_id=1,
        routes=[{'destination': '172.16.0.0/16', 'nexthop': '10.10.1.254'}]))
    ha_router_case('l3-ha-dual-stack-auth-health-check-debug', router_dict(
        'r-ha-2', [rport('r-ha-2-qr1', 'net-d', ['10.20.1.1', '2001:db8:1::1'], [v4b, slaac], 710),
                   rport('r-ha-2-qr2', 'net-f', ['2001:db8:2::1'], [stateful], 711)],
        gw=gw_port('r-ha-2-gw', 4, v6=True), ha=True, vr_id=2),
        overrides={'ha_vrrp_auth_type': 'PASS', 'ha_vrrp_auth_password': 'secret',
                   'ha_vrrp_health_check_interval': 30, 'ha_vrrp_advert_int': 3,
                   'debug': True})
    ha_router_case('l3-ha-backup-log-dir-per-router', router_dict(
        'r-ha-3', [rport('r-ha-3-qr1', 'net-a', ['10.10.1.1'], [v4a], 720)],
        gw=gw_port('r-ha-3-gw', 5), ha=True, vr_id=3), primary=False,
        overrides={'log_dir': '/var/log/neutron', 'per_router_log_files': True,
                   'router_log_files_in_ha_confs': False})
    ha_router_case('l3-ha-log-dir-shared-file', router_dict(
        'r-ha-4', [rport('r-ha-4-qr1', 'net-a', ['10.10.1.1'], [v4a], 730)], ha=True, vr_id=4),
        primary=False, overrides={'log_dir': '/var/log/neutron'})

    # Several VRRP instances in one keepalived.conf: Neutron's HA router always uses one instance
    # per router/keepalived; KeepalivedConf/KeepalivedManager support more, shown here directly.
    with case('keepalived-manager-two-vrrp-instances'):
        monitor = external_process.ProcessMonitor(config=CONF, resource_type='router')
        rid = uid('kam-two')
        conf = keepalived.KeepalivedConf()
        for vr in (10, 11):
            inst = keepalived.KeepalivedInstance('BACKUP', 'ha-%s' % uid('kam-%d' % vr)[:11], vr,
                                                 ['169.254.192.0/18'], nopreempt=True, advert_int=2)
            inst.track_interfaces.append(inst.interface)
            inst.add_vip('192.0.2.%d/24' % vr, 'qr-%s' % uid('kq-%d' % vr)[:11], None)
            inst.virtual_routes.gateway_routes = [
                keepalived.KeepalivedVirtualRoute('0.0.0.0/0', '192.0.2.1',
                                                  'qg-%s' % uid('kg-%d' % vr)[:11])]
            conf.add_instance(inst)
        km = keepalived.KeepalivedManager(rid, conf, monitor, CONF.ha_confs_path,
                                          namespace='qrouter-' + rid)
        km.spawn()
        km.spawn()  # already running: reload_cfg -> HUP
        km.disable()


def ovn_cases():
    if ovn_meta_driver is None:
        return
    for name, v6 in (('ovn-metadata-ipv4', False), ('ovn-metadata-dual-stack', True)):
        with case(name):
            monitor = external_process.ProcessMonitor(config=CONF, resource_type='metadata')
            net_name = uid('ovn-' + name)  # get_network_name_from_datapath(): the Neutron network id
            namespace = ovn_meta_agent.MetadataAgent._get_namespace_name(net_name)
            veth_name = ovn_meta_agent.MetadataAgent._get_veth_name(net_name)
            # the exact call of MetadataAgent.provision_datapath():
            ovn_meta_driver.MetadataDriver.spawn_monitored_metadata_proxy(
                monitor, namespace, n_const.METADATA_PORT, CONF,
                bind_address=n_const.METADATA_V4_IP, network_id=net_name,
                bind_address_v6=n_const.METADATA_V6_IP if v6 else None,
                bind_interface=veth_name[1])
            # teardown_datapath():
            ovn_meta_driver.MetadataDriver.destroy_monitored_metadata_proxy(
                monitor, net_name, CONF, namespace)


# ---------------------------------------------------------------------------------------------------


def _map(s):
    return s.replace(TMP_STATE, STATE_ROOT).replace(TMP_KILL, KILL_ROOT.rstrip('/'))


def _config_for(rec):
    argv = rec['argv']
    path = None
    prog = rec['program']
    if prog == 'haproxy':
        path = argv[argv.index('-f') + 1]
    elif prog == 'keepalived':
        path = argv[argv.index('-f') + 1]
    elif prog == 'radvd':
        path = argv[argv.index('-C') + 1]
    if not path:
        return None
    return {'path': _map(path), 'text': _map(CONFIG_SNAPSHOTS[rec['_i']])}


CONFIG_SNAPSHOTS = {}
_orig_record = _record


def _record_with_snapshot(cmd, async_=False):
    n = len(SPAWNS)
    out = _orig_record(cmd, async_)
    if len(SPAWNS) > n:  # snapshot the config file as it was when the program was started
        rec = SPAWNS[-1]
        rec['_i'] = n
        argv = rec['argv']
        flag = {'haproxy': '-f', 'keepalived': '-f', 'radvd': '-C'}.get(rec['program'])
        if flag and flag in argv:
            with open(argv[argv.index(flag) + 1]) as f:
                CONFIG_SNAPSHOTS[n] = f.read()
    return out


_record = _record_with_snapshot  # noqa: F811 (fake_execute/fake_create_process look it up)


def main(args):
    out_path = None
    sig_path = None
    it = iter(args)
    for a in it:
        if a == '--signals':
            sig_path = next(it)
        else:
            out_path = a
    try:
        dhcp_cases()
        l3_cases()
        ovn_cases()
        result = []
        seen = set()
        for rec in SPAWNS:
            item = {'case': rec['case'], 'program': rec['program'], 'netns': rec['netns'],
                    'argv': [_map(a) for a in rec['argv']], 'config': _config_for(rec),
                    'launcher': [_map(a) for a in rec['launcher']]}
            key = json.dumps(item, sort_keys=True)
            if key in seen:  # a respawn of the same thing within a case
                continue
            seen.add(key)
            result.append(item)
        text = json.dumps(result, indent=1, sort_keys=False) + '\n'
        if out_path:
            with open(out_path, 'w') as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        if sig_path:
            sigs = [{k: (_map(v) if isinstance(v, str) else
                         [_map(x) for x in v] if isinstance(v, list) else v)
                     for k, v in s.items()} for s in SIGNALS]
            with open(sig_path, 'w') as f:
                json.dump({'signals': sigs, 'probes': PROBES, 'other_commands': [
                    {'case': o['case'], 'cmd': [_map(x) for x in o['cmd']]} for o in OTHER]},
                    f, indent=1)
        print('%d spawns, %d signal commands, %d probes, %d other commands recorded'
              % (len(result), len(SIGNALS), len(PROBES), len(OTHER)), file=sys.stderr)
    finally:
        shutil.rmtree(_tmp, ignore_errors=True)


if __name__ == '__main__':
    main(sys.argv[1:])
    # oslo.service loopingcall workers (started by Neutron helpers) would keep the interpreter alive.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
