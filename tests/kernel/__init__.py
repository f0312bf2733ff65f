"""Kernel tests (marker `kernel`, privileged): the BPF fast path and the network
namespaces the tests create (NATs, MTUs, routes). The scripts here that are not test
modules run inside those namespaces."""
