"""Instant boot, recovery groups, migration back and stop: the jobs that run VMs from backups."""
