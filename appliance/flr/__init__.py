"""File-level recovery: the partitions, volumes and files inside a restore point's disks.

Read straight from the store's read path, so a listing or an extraction fetches only the
chunks the file system's structures and the file's extents live in; nothing is mounted
and no copy of the disk is made. The parsers are the dissect.* packages (the optional
`flr` extra), reached only through `filesystems`.
"""
