"""The agent side: code that runs inside the untrusted agent container.

Python 3.9+ and the standard library only (neutron_pm.py also imports Neutron's own packages, which
the agent image has, once Neutron asks for the class). Nothing here imports the host side: `safespawn
wrappers install` copies client.py, neutron_pm.py and neutron_hook.py, and writes the scripts
scripts.py renders, into the agent's wrappers directory, where no other part of safespawn exists;
scripts.py itself runs on the host, for that command. tests/unit/test_boundary.py holds the line.

    client.py        requests and replies over a channel; the wrappers' and kill scripts' entry points
    neutron_pm.py    Neutron's ProcessManager over the channel (copied as safespawn_neutron.py)
    neutron_hook.py  the sitecustomize that swaps that class in
    scripts.py       the wrapper, kill-script and launcher templates, and the files `wrappers install` copies
"""
