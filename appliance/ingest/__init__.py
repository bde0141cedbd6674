"""Ingest: reading disk images (raw, VMDK flat/sparse/streamOptimized) into the store."""
