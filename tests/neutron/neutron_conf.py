"""Neutron's agent options, registered the way its DHCP and L3 agents do, for the scripts under
tests/neutron/ that run with the Neutron venv's python (never imported by the project's tests)."""

import warnings

# Quiet eventlet's deprecation chatter; Neutron imports it.
warnings.filterwarnings('ignore')

from neutron.common import config as common_config  # noqa: E402
from neutron.conf.agent import common as agent_conf  # noqa: E402
from neutron.conf.agent import dhcp as dhcp_conf  # noqa: E402
from neutron.conf.agent.l3 import config as l3_conf  # noqa: E402
from neutron.conf.agent.l3 import ha as ha_conf  # noqa: E402
from neutron.conf.agent.metadata import config as meta_conf  # noqa: E402
from neutron.conf.plugins.ml2.drivers import ovs_conf  # noqa: E402
from oslo_config import cfg  # noqa: E402

CONF = cfg.CONF


def _reg(fn, *a, **k):
    try:
        fn(*a, **k)
    except (cfg.DuplicateOptError, cfg.ArgsAlreadyParsedError):
        pass


def register_agent_options():
    """The union of what neutron.agent.dhcp_agent.register_options and neutron.agent.l3_agent.register_opts
    register (one process plays both agents; defaults are identical), then parse no files."""
    _reg(common_config.register_common_config_options)
    _reg(l3_conf.register_l3_agent_config_opts, l3_conf.OPTS, CONF)
    _reg(ha_conf.register_l3_agent_ha_opts, CONF)
    _reg(meta_conf.register_meta_conf_opts, meta_conf.SHARED_OPTS, CONF)
    _reg(meta_conf.register_meta_conf_opts, meta_conf.METADATA_RATE_LIMITING_OPTS, cfg=CONF,
         group=meta_conf.RATE_LIMITING_GROUP)
    _reg(meta_conf.register_meta_conf_opts, meta_conf.METADATA_HAPROXY_OPTS, cfg=CONF,
         group=meta_conf.HAPROXY_GROUP)
    _reg(agent_conf.register_interface_driver_opts_helper, CONF)
    _reg(agent_conf.register_agent_state_opts_helper, CONF)
    _reg(agent_conf.register_availability_zone_opts_helper, CONF)
    _reg(agent_conf.register_interface_opts, CONF)
    _reg(agent_conf.register_external_process_opts, CONF)
    _reg(agent_conf.register_process_monitor_opts, CONF)
    _reg(agent_conf.register_ra_opts, CONF)
    _reg(agent_conf.register_root_helper, CONF)
    _reg(dhcp_conf.register_agent_dhcp_opts, CONF)
    _reg(ovs_conf.register_ovs_opts, CONF)
    _reg(ovs_conf.register_ovs_agent_opts, CONF)
    CONF([], project='neutron', default_config_files=[], default_config_dirs=[])
    return CONF
