"""Operations: the commands an operator runs as root to set up and look after the broker.

install.py and units.py (systemd units and channel directories), wrappers.py (ship the agent side
into an agent's wrappers directory), adopt.py (take over legacy sidecars), doctor.py (what
`check-config` and `doctor` test). They use the broker, the runtimes and, to ship or act as a client
of a channel, the agent side; nothing imports them but cli.py.
"""
