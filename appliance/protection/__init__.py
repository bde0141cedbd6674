"""Protecting vSphere VMs: backups taken by the appliance itself, their policies and their schedule."""
