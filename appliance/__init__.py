"""Instant-recovery NFS datastore appliance: VM backups in a deduplicated chunk store,
served as bootable VMDK disks. Data flows one way:
source -> ingest -> store/catalog -> datastore (+ overlay) -> FUSE | NFS."""
