"""The broker: the root side that reads a channel's requests, decides and acts on them.

Runs as root on the host (Python 3.11+, standard library only). Everything a channel holds is
hostile input here. It imports the top-level `config` and `errors`, and `runtime/` to act; never the
agent side, never `ops/`. docs/architecture.md, "One sync, phase by phase", walks through it.
"""
