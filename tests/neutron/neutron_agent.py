#!/usr/bin/env python3
# ruff: noqa: E402, UP031  (runs in the Neutron venv, in Neutron's own style; imports follow the config setup)
"""Play a Neutron agent with Neutron 29's OWN code, driven line by line by a test.

Runs with the Neutron venv's python (scripts/neutron-venv), never the project's. Reads one JSON
command per line on stdin, answers one JSON line on stdout: {"ok": true, ...} or {"ok": false,
"error": TRACEBACK}. Neutron's logs go to stderr.

Environment: NEUTRON_STATE_PATH (the channel's data dir, Neutron's state_path), KILL_SCRIPTS_PATH
(`safespawn wrappers install` output), and PATH with that same folder first, so that Neutron's
`ip netns exec NS env PROCESS_TAG=... dnsmasq ...` runs the safespawn wrapper.

What is Neutron's own code here, unmodified: ProcessManager (enable, active, reload_cfg, disable,
kill scripts, pid files), the Dnsmasq driver (command line, hosts/opts/leases files, enable,
reload_allocations, disable), the metadata driver (haproxy config and command line, spawn and
destroy), KeepalivedManager/KeepalivedConf and HaRouter's keepalived and state-change-monitor
methods, ra.DaemonMonitor (radvd). What is not: no RPC and no port plugging (the test creates the namespaces and interfaces;
DeviceManager.setup returns the test's interface), no dhcp_release (lease release on reload).
"""
import json
import os
import sys
import traceback
import types

from neutron_conf import register_agent_options  # noqa: E402

CONF = register_agent_options()

CONF.set_override('state_path', os.environ['NEUTRON_STATE_PATH'])
CONF.set_override('host', 'net-node-1')
CONF.set_override('root_helper', '', 'AGENT')
CONF.set_override('kill_scripts_path', os.environ['KILL_SCRIPTS_PATH'], 'AGENT')
CONF.set_override('check_child_processes_interval', 0, 'AGENT')
CONF.set_override('interface_driver', 'openvswitch')
CONF.set_override('ha_vrrp_advert_int', 1)

from neutron import privileged  # noqa: E402

for _ctx in ('default', 'dhcp_release_cmd', 'namespace_cmd', 'link_cmd'):
    if hasattr(privileged, _ctx):
        getattr(privileged, _ctx).set_client_mode(False)

from neutron.agent.l3 import ha_router
from neutron.agent.linux import dhcp, external_process, interface, ra
from neutron.agent.metadata import driver as metadata_driver
from neutron_lib import constants as n_const

MONITOR = external_process.ProcessMonitor(config=CONF, resource_type='test')

# -- DHCP ------------------------------------------------------------------------------------------
# Port plugging is the test's job: the namespace and the interface already exist.
INTERFACE = {}
dhcp.DeviceManager.setup = lambda self, network, segment=None: INTERFACE[network.id]
dhcp.DeviceManager.destroy = lambda self, network, device_name, segment=None: None
dhcp.DeviceManager.update = lambda self, network, device_name: None
dhcp.Dnsmasq._release_unused_leases = lambda self: None  # needs dhcp_release in the agent
DRIVERS = {}


class _Plugin:
    """The DHCP agent's RPC API is not used by the calls made here."""

    def get_networks(self, *a, **k):
        return []

    def get_ports(self, *a, **k):  # the OVN metadata port lookup: none here
        return []


PLUGIN = _Plugin()


def _network(a):
    net_id, sub_id = a['network_id'], a['subnet_id']
    subnet = dhcp.DictModel(id=sub_id, network_id=net_id, name='sub', cidr=a['cidr'], ip_version=4,
                            gateway_ip=a.get('gateway'), enable_dhcp=True, dns_nameservers=[],
                            host_routes=[], ipv6_address_mode=None, ipv6_ra_mode=None,
                            subnetpool_id=None, segment_id=None)
    ports = []
    for i, p in enumerate(a['ports']):
        ports.append(dhcp.DictModel(
            id=p.get('id') or '%08d-0000-4000-8000-%012d' % (i, i), network_id=net_id,
            mac_address=p['mac'], device_owner=p.get('owner', 'compute:nova'),
            device_id=p.get('device_id', 'dev-%d' % i), admin_state_up=True, extra_dhcp_opts=[],
            fixed_ips=[dhcp.DictModel(subnet_id=sub_id, ip_address=p['ip'])],
            dns_assignment=[dhcp.DictModel(hostname='host-' + p['ip'].replace('.', '-'),
                                           ip_address=p['ip'],
                                           fqdn='host-%s.openstacklocal.' % p['ip'].replace('.', '-'))],
            dns_name=''))
    return dhcp.NetModel(id=net_id, name='net', admin_state_up=True, mtu=a.get('mtu', 1450),
                         subnets=[subnet], non_local_subnets=[], ports=ports, segments=[],
                         project_id='p', tenant_id='p')


def dhcp_enable(a):
    """DhcpAgent.configure_dhcp_for_network -> Dnsmasq.enable(), as the agent calls it."""
    net = _network(a)
    INTERFACE[net.id] = a['interface']
    drv = dhcp.Dnsmasq(CONF, net, MONITOR, plugin=PLUGIN)
    DRIVERS[net.id] = drv
    drv.enable()
    pm = drv._get_process_manager()
    return {'active': drv.active, 'pid': pm.pid, 'namespace': net.namespace,
            'argv': open('/proc/%d/cmdline' % pm.pid).read().split('\0')[:-1] if pm.pid else None}


def _driver(a):
    """The agent's driver for the network, or (after an agent restart) a fresh one, which reads the
    interface name back from the network's conf dir as Neutron's does."""
    if a['network_id'] not in DRIVERS:
        INTERFACE[a['network_id']] = a['interface']
        DRIVERS[a['network_id']] = dhcp.Dnsmasq(CONF, _network(a), MONITOR, plugin=PLUGIN)
    return DRIVERS[a['network_id']]


def dhcp_reload(a):
    """A port was added: Dnsmasq.reload_allocations() rewrites the files and sends HUP."""
    drv = _driver(a)
    drv.network = _network(a)
    drv.reload_allocations()
    return {'active': drv.active, 'pid': drv._get_process_manager().pid}


def dhcp_disable(a):
    drv = _driver(a)
    DRIVERS.pop(a['network_id'])
    drv.disable(retain_port=False, block=True)
    return {'active': drv.active}


def pm_state(a):
    """A fresh ProcessManager, as a restarted agent builds it, and what it sees."""
    pm = external_process.ProcessManager(CONF, a['uuid'], namespace=a.get('namespace'),
                                         service=a['service'], pid_file=a.get('pid_file'),
                                         pids_path=a.get('pids_path'))
    return {'active': pm.active, 'pid': pm.pid, 'cmdline': pm.cmdline}


def pm_enable(a):
    """ProcessManager.enable() for an already running process must not start a second one."""
    started = []
    pm = external_process.ProcessManager(
        CONF, a['uuid'], namespace=a.get('namespace'), service=a['service'], pid_file=a.get('pid_file'),
        default_cmd_callback=lambda pid_file: started.append(pid_file) or ['false'])
    pm.enable(ensure_active=True)
    return {'active': pm.active, 'pid': pm.pid, 'started': bool(started)}


def pm_reload_cfg(a):
    pm = external_process.ProcessManager(CONF, a['uuid'], namespace=a.get('namespace'),
                                         service=a['service'], pid_file=a.get('pid_file'))
    pm.reload_cfg()
    return {'active': pm.active, 'pid': pm.pid}


def pm_disable(a):
    pm = external_process.ProcessManager(CONF, a['uuid'], namespace=a.get('namespace'),
                                         service=a['service'], pid_file=a.get('pid_file'))
    pid = pm.pid
    pm.disable(sig=a.get('sig', '9'))
    return {'active': pm.active, 'pid_before': pid}


def monitor_check(a):
    """One pass of Neutron's ProcessMonitor over what it monitors; which services it respawned."""
    respawned = []
    execute = MONITOR._execute_action

    def record(service_id):
        respawned.append('%s/%s' % (service_id.uuid, service_id.service))
        return execute(service_id)

    MONITOR._execute_action = record
    try:
        MONITOR._check_child_processes()
    finally:
        MONITOR._execute_action = execute
    return {'respawned': respawned}


# -- metadata proxy --------------------------------------------------------------------------------
def metadata_spawn(a):
    """The DHCP agent's call (isolated network metadata): haproxy on 169.254.169.254:80."""
    metadata_driver.MetadataDriver.spawn_monitored_metadata_proxy(
        MONITOR, a['namespace'], a.get('port', 80), CONF, bind_address=a.get('bind', n_const.METADATA_V4_IP),
        network_id=a.get('network_id'), router_id=a.get('router_id'))
    uuid = a.get('network_id') or a.get('router_id')
    pm = metadata_driver.MetadataDriver._get_metadata_proxy_process_manager(uuid, CONF,
                                                                             ns_name=a['namespace'])
    return {'active': pm.active, 'pid': pm.pid, 'pid_file': pm.get_pid_file_name(),
            'config': open(os.path.join(CONF.state_path, 'ns-metadata-proxy', uuid + '.conf')).read()}


def metadata_destroy(a):
    uuid = a.get('network_id') or a.get('router_id')
    metadata_driver.MetadataDriver.destroy_monitored_metadata_proxy(MONITOR, uuid, CONF, a['namespace'])
    pm = metadata_driver.MetadataDriver._get_metadata_proxy_process_manager(uuid, CONF,
                                                                             ns_name=a['namespace'])
    return {'active': pm.active}


# -- HA router: keepalived and the state-change monitor --------------------------------------------
class Router:
    """A router object carrying Neutron's own HaRouter methods; no RPC, no port plugging."""

    ha_priority = ha_router.HaRouter.ha_priority
    ha_vr_id = ha_router.HaRouter.ha_vr_id
    ha_namespace = ha_router.HaRouter.ha_namespace
    _init_keepalived_manager = ha_router.HaRouter._init_keepalived_manager
    enable_keepalived = ha_router.HaRouter.enable_keepalived
    disable_keepalived = ha_router.HaRouter.disable_keepalived
    _disable_manager = ha_router.HaRouter._disable_manager
    _get_keepalived_instance = ha_router.HaRouter._get_keepalived_instance
    _get_primary_vip = ha_router.HaRouter._get_primary_vip
    get_ha_device_name = ha_router.HaRouter.get_ha_device_name
    _get_state_change_monitor_process_manager = ha_router.HaRouter._get_state_change_monitor_process_manager
    _get_state_change_monitor_callback = ha_router.HaRouter._get_state_change_monitor_callback
    spawn_state_change_monitor = ha_router.HaRouter.spawn_state_change_monitor
    destroy_state_change_monitor = ha_router.HaRouter.destroy_state_change_monitor

    def __init__(self, router_id, ha_port_id, ha_cidr, vr_id):
        self.router_id = router_id
        self.router = {'id': router_id, 'ha_vr_id': vr_id, 'priority': 50}
        self.ns_name = 'qrouter-' + router_id
        self.agent_conf = CONF
        self.ha_port = {'id': ha_port_id, 'network_id': 'n', 'subnets': [{'cidr': ha_cidr}]}
        self.driver = types.SimpleNamespace(DEV_NAME_LEN=interface.LinuxInterfaceDriver.DEV_NAME_LEN)


ROUTERS = {}


def ha_spawn(a):
    r = Router(a['router_id'], a['ha_port_id'], a['ha_cidr'], a.get('vr_id', 1))
    ROUTERS[r.router_id] = r
    r._init_keepalived_manager(MONITOR)
    r.spawn_state_change_monitor(MONITOR)
    r.enable_keepalived()
    km = r.keepalived_manager
    return {'interface': r.get_ha_device_name(), 'primary_vip': r._get_primary_vip(),
            'conf_dir': km.get_conf_dir(), 'config': km.get_conf_on_disk(),
            'keepalived_pid_file': km.get_process().get_pid_file_name(),
            'monitor_pid_file': r._get_state_change_monitor_process_manager().get_pid_file_name()}


def ha_state(a):
    r = ROUTERS[a['router_id']]
    km = r.keepalived_manager
    mon = r._get_state_change_monitor_process_manager()
    return {'keepalived_active': km.get_process().active, 'check_processes': km.check_processes(),
            'monitor_active': mon.active, 'monitor_pid': mon.pid, 'keepalived_pid': km.get_process().pid}


def ha_disable(a):
    r = ROUTERS.pop(a['router_id'])
    r.destroy_state_change_monitor(MONITOR)
    r.disable_keepalived()
    return {'keepalived_active': r.keepalived_manager.get_process().active,
            'monitor_active': r._get_state_change_monitor_process_manager().active}


# -- radvd -----------------------------------------------------------------------------------------
def _radvd(a):
    # RouterInfo.enable_radvd builds it this way; qr- devices are named by the interface driver.
    return ra.DaemonMonitor(a['router_id'], 'qrouter-' + a['router_id'], MONITOR,
                            lambda port_id: ('qr-' + port_id)[:interface.LinuxInterfaceDriver.DEV_NAME_LEN], CONF)


def radvd_enable(a):
    """RouterInfo.enable_radvd(): a config from the router's ports, then spawn or HUP."""
    mon = _radvd(a)
    mon.enable(a['ports'])
    pm = mon._get_radvd_process_manager()
    conf = os.path.join(CONF.ra_confs, a['router_id'] + '.radvd.conf')
    return {'active': mon.enabled, 'pid': pm.pid, 'config': open(conf).read()}


def radvd_disable(a):
    mon = _radvd(a)
    mon.disable()
    return {'active': mon.enabled}


OPS = {f.__name__: f for f in (radvd_enable, radvd_disable, dhcp_enable, dhcp_reload, dhcp_disable, pm_state, pm_enable, pm_reload_cfg,
                                pm_disable, monitor_check, metadata_spawn, metadata_destroy, ha_spawn, ha_state, ha_disable)}


def main():
    print(json.dumps({'ok': True, 'ready': True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            result = OPS[cmd.pop('op')](cmd)
            out = {'ok': True}
            out.update(result or {})
        except BaseException:  # report everything to the test, including WaitTimeout
            out = {'ok': False, 'error': traceback.format_exc()}
        print(json.dumps(out), flush=True)


if __name__ == '__main__':
    main()
