"""Phases 1-3 wired up as the combined demo program ``cs-demo``."""
