"""Unit tests: the codec, the sans-IO core and pure helpers; no socket, no process.
`make unit` runs exactly these, in seconds."""
