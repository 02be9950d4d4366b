#!/usr/bin/env python3
# ruff: noqa: E402, UP031
"""neutron_agent.py's Neutron agent, plus the steps the ProcessManager-class tests need.

Run it through the `safespawn-neutron` launcher: then every ProcessManager that Neutron's own code
builds (Dnsmasq, MetadataDriver, KeepalivedManager, HaRouter, ra.DaemonMonitor) is safespawn's class.
The test gives it no wrapper on PATH and an empty kill_scripts_path.
"""
import time

import neutron_agent as agent  # noqa: F401  (configures Neutron and defines the shared steps)
from neutron.agent.linux import external_process
from neutron.agent.ovn.metadata import driver as ovn_metadata_driver
from neutron_lib import constants as n_const

RESPAWNS = []


def is_class(a):
    """Which class Neutron's callers get from the module attribute."""
    cls = external_process.ProcessManager
    return {'class': '%s.%s' % (cls.__module__, cls.__name__),
            'neutron_base': external_process.ProcessManager.__mro__[1].__module__}


def monitor_start(a):
    """A ProcessMonitor as the DHCP agent builds it, checking every `interval` seconds; later
    drivers register with it. Each respawn it decides on is recorded."""
    agent.CONF.set_override('check_child_processes_interval', a['interval'], 'AGENT')
    mon = external_process.ProcessMonitor(config=agent.CONF, resource_type='dhcp')
    orig = mon._respawn_action

    def respawn(service_id):
        RESPAWNS.append({'t': time.time(), 'uuid': service_id.uuid, 'service': service_id.service})
        orig(service_id)

    mon._respawn_action = respawn
    agent.MONITOR = mon
    return {}


def monitor_events(a):
    return {'respawns': list(RESPAWNS)}


def monitor_stop(a):
    agent.MONITOR.stop()
    return {}


def pm_state_neutron(a):
    """What Neutron's own ProcessManager (the class the launcher replaced) would say."""
    pm = external_process._safespawn_original(agent.CONF, a['uuid'], namespace=a.get('namespace'),
                                              service=a['service'], pid_file=a.get('pid_file'))
    return {'active': pm.active, 'pid': pm.pid}


def pm_generation(a):
    pm = external_process.ProcessManager(agent.CONF, a['uuid'], namespace=a.get('namespace'),
                                         service=a['service'])
    return {'active': pm.active, 'pid': pm.pid, 'generation': pm.generation}


def channel_status(a):
    """The status as the class reads it (for failure messages)."""
    import os
    with open(os.path.join(os.environ['SAFESPAWN_CHANNEL_DIR'], 'outbox', 'status.json')) as f:
        return {'status': f.read()}


def pm_active_cost(a):
    """Time `active` on one manager (as ProcessMonitor calls it) and on fresh managers."""
    pm = external_process.ProcessManager(agent.CONF, a['uuid'], namespace=a.get('namespace'),
                                         service=a['service'])
    n = a.get('n', 1000)
    t0 = time.perf_counter()
    values = [pm.active for _ in range(n)]
    t1 = time.perf_counter()
    for _ in range(n):
        external_process.ProcessManager(agent.CONF, a['uuid'], namespace=a.get('namespace'),
                                        service=a['service']).active
    t2 = time.perf_counter()
    return {'all_active': all(values), 'per_call': (t1 - t0) / n, 'per_fresh_call': (t2 - t1) / n}


def dhcp_start(a):
    """Dnsmasq.enable() as the DHCP agent calls it; nothing read from /proc (the agent may be in its own
    pid namespace, where the sidecar's host pid means nothing)."""
    net = agent._network(a)
    agent.INTERFACE[net.id] = a['interface']
    drv = agent.dhcp.Dnsmasq(agent.CONF, net, agent.MONITOR, plugin=agent.PLUGIN)
    agent.DRIVERS[net.id] = drv
    drv.enable()
    pm = drv._get_process_manager()
    return {'active': drv.active, 'pid': pm.pid, 'generation': pm.generation, 'namespace': net.namespace}


def ovn_metadata_spawn(a):
    """The OVN metadata agent's call (MetadataAgent.provision_datapath) in an ovnmeta- namespace."""
    ovn_metadata_driver.MetadataDriver.spawn_monitored_metadata_proxy(
        agent.MONITOR, a['namespace'], n_const.METADATA_PORT, agent.CONF, bind_address=n_const.METADATA_V4_IP,
        network_id=a['network_id'], bind_interface=a['interface'])
    pm = ovn_metadata_driver.MetadataDriver._get_metadata_proxy_process_manager(
        a['network_id'], agent.CONF, ns_name=a['namespace'])
    return {'active': pm.active, 'pid': pm.pid}


def ovn_metadata_destroy(a):
    ovn_metadata_driver.MetadataDriver.destroy_monitored_metadata_proxy(
        agent.MONITOR, a['network_id'], agent.CONF, a['namespace'])
    pm = ovn_metadata_driver.MetadataDriver._get_metadata_proxy_process_manager(
        a['network_id'], agent.CONF, ns_name=a['namespace'])
    return {'active': pm.active}


agent.OPS.update({f.__name__: f for f in (is_class, channel_status, pm_state_neutron, dhcp_start, monitor_start, monitor_events, monitor_stop, pm_generation,
                                          pm_active_cost, ovn_metadata_spawn, ovn_metadata_destroy)})

if __name__ == '__main__':
    agent.main()
