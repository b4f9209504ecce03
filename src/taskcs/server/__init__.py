"""Servers: the in-process server of phases 1-2 and the cs-server process of phase 3."""
