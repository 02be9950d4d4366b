"""Built-in sidecar profiles (TOML). Override one by writing /etc/safespawn/profiles/NAME.toml."""
