"""The appliance's one exception hierarchy.

Every error an operator can cause or meet carries a complete, one-line message
(naming the store, VM, restore point, path or offset involved) and the exit code
the CLI returns for it, so the CLI never has to guess and never prints a traceback.
Protocol adapters (FUSE, NFS) map these classes to errno / nfsstat3 in one place.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance reports to a user."""

    exit_code: int = 1


class UsageError(ApplianceError):
    """The command line or an argument value is wrong."""

    exit_code = 2


class ConfigError(ApplianceError):
    """A configuration file the appliance refuses to start with.

    The message names the file, the key and the reason, so an operator can fix the
    file from the one line a failed start leaves in the journal; `key` and `reason` are
    kept apart so the CLI can name a command-line flag instead when the value came
    from one.
    """

    exit_code = 2

    def __init__(self, source: str, reason: str, key: str | None = None) -> None:
        self.source, self.reason, self.key = source, reason, key
        super().__init__(f'{source}: key "{key}": {reason}' if key else f"{source}: {reason}")


class StoreError(ApplianceError):
    """The store is missing, not initialised, of another version, or busy."""


class StoreUnreachable(StoreError):
    """The engine holding the packs did not answer (a dropped connection, a timeout, a 5xx after retries)."""


class StoreBusy(StoreError):
    """Another process holds the lock this operation needs."""

    exit_code = 75


class NotFound(ApplianceError):
    """An unknown VM, restore point or disk was named (in the store or in vSphere)."""


class InvalidName(ApplianceError):
    """A VM or session name that cannot be a single path component."""

    exit_code = 2


class SourceError(ApplianceError):
    """A disk image given to ingest is unreadable, truncated or malformed."""


class ChangedAreasError(ApplianceError):
    """A changed-areas file is malformed or names ranges outside its disk."""


class IntegrityError(ApplianceError):
    """Stored bytes fail their checksum or a reference points at nothing.

    Readers must never see wrong bytes: this error replaces them.
    """

    exit_code = 3


class DamageFound(ApplianceError):
    """`verify` found damage; the message summarises it."""


class InvalidRequest(UsageError):
    """An API request its schema refuses: a missing field, a wrong type, a name that breaks its rule."""


class OutputRefused(UsageError):
    """A file the appliance was asked to create on its host cannot be: it exists, its folder is missing or read-only."""


class NotConfigured(UsageError):
    """What a request needs is not configured on this appliance (no vSphere connection, or several and none named)."""


class MethodNotAllowed(UsageError):
    """An API path asked with a method it does not answer."""


class NameTooLong(InvalidName):
    """A name longer than a path component may be."""


class ReadOnly(ApplianceError):
    """A write into a restore point, which is read-only in every view."""


class AlreadyExists(ApplianceError):
    """A name that is already taken in its directory."""


class NotEmpty(ApplianceError):
    """rmdir of a directory that still has entries."""


class NotADirectory(ApplianceError):
    """A directory operation on something that is not a directory."""


class IsADirectory(ApplianceError):
    """A file operation on a directory."""


class PermissionDenied(ApplianceError):
    """An operation the datastore never allows at that place (e.g. mkdir in /sessions)."""


class StaleHandle(ApplianceError):
    """An inode that existed once but has been removed."""


class NotSupported(ApplianceError):
    """An operation the datastore does not implement (hard links, device nodes)."""


class SessionBusy(ApplianceError):
    """A session that a running `mount`/`serve` holds open."""

    exit_code = 75


class TryAgain(ApplianceError):
    """A session paused for a moment (being committed or removed): clients retry."""

    exit_code = 75


class LimitReached(ApplianceError):
    """A configured limit (sessions, instant boots) would be exceeded."""

    exit_code = 75


class Unauthorized(ApplianceError):
    """An API call without the appliance's token."""


class VsphereError(ApplianceError):
    """vCenter or ESXi refused or failed an operation; the message names the object and the fault."""


class VsphereUnreachable(VsphereError):
    """No session: the URL does not answer, its certificate fails verification, or the login is refused."""


class VsphereTimeout(VsphereError):
    """A vSphere task did not finish in time; it may still be running in vCenter."""


class TaskFailed(VsphereError):
    """A vSphere task ended in a fault; `fault` is its type's name (e.g. "FileLocked"), for callers that retry
    or fall back on one kind of fault only."""

    def __init__(self, message: str, fault: str) -> None:
        super().__init__(message)
        self.fault = fault


class TransferError(VsphereError):
    """Reading a disk file from an ESXi datastore failed or gave an answer that cannot be trusted as data."""


class BackupRefused(VsphereError):
    """A VM (or one of its disks) that this appliance cannot back up; the message says why and what to change."""


class DatastoreConflict(VsphereError):
    """The appliance's datastore name is taken by a datastore of another NFS server or path."""


class DatastoreInUse(VsphereError):
    """An unmount refused because VMs registered on the host still use the datastore."""


class VerificationFailed(ApplianceError):
    """A booted VM did not pass its verification (tools, IP, console text, script) in time."""


class HypervisorError(ApplianceError):
    """QEMU could not start, answer, or do what it was asked (the message says which guest)."""


class HypervisorTimeout(HypervisorError):
    """QEMU or its guest did not answer or reach a state within the time allowed."""


class QmpCommandFailed(HypervisorError):
    """QEMU answered a QMP command with an error; `error_class` is QEMU's class name."""

    def __init__(self, message: str, error_class: str) -> None:
        self.error_class = error_class
        super().__init__(message)


class GuestImageError(ApplianceError):
    """The demo's guest disk could not be built or read: a tool or package is missing, or a step failed."""


class UnreadableVolume(ApplianceError):
    """A volume whose files cannot be browsed: encrypted, LVM, no file system read here, or none chosen."""


class RangeNotSatisfiable(ApplianceError):
    """A byte range that starts past the end of the file asked for."""


class DamagedFileSystem(ApplianceError):
    """A file system whose structures do not parse; the message names the volume, the path and the fault."""

    exit_code = 3


class SessionDiskError(ApplianceError):
    """A session disk's overlay could not be opened, read, written or flushed (I/O or damage).

    The message names the overlay directory and the offset involved; adapters answer
    EIO / NFS3ERR_IO, as for a damaged chunk.
    """


class RemoteRefused(ApplianceError):
    """Another appliance could not be trusted or used: wrong fingerprint or token, unreachable, or incompatible store."""


class ChunkRefused(IntegrityError):
    """A replicated chunk whose bytes do not hash to its ID (damaged in transit or by its sender); nothing of it is kept."""


class ChunksMissing(ApplianceError):
    """A replicated restore point names chunks this store does not hold (yet): the sender sends them and retries."""

    exit_code = 75
