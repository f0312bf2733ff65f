"""Configuration: the YAML file and command-line flags become one frozen `Settings`.

`settings` (the Settings dataclass, loading and merging), `schema` (the file's dotted keys,
each with its checker; errors name the file, line and key), `values` (what each value may
be), `secret_files` (secrets named by path), `nodes` (what the nodes of one service must
share) and `uris` (the STUN/TURN URIs clients are given for our listeners)."""
