"""The API's request bodies and named path parameters, as typed models.

A checked string (a name, a verification, a host path) is validated by the appliance's
own check, with its own message, and published in the OpenAPI document as a pattern
derived from the same rule, so the schema states exactly what the server accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from appliance.errors import ApplianceError, UsageError
from appliance.names import JOB_ID, POINT_REF, SESSION_NAME, VM_NAME, VOLUME_REF
from appliance.verification import check_offered, offered_pattern, parse_verification, verification_pattern


def validated(check: Callable[[str], object]) -> AfterValidator:
    """A validator that runs the appliance's own `check`; its error becomes the message."""

    def validate(value: str) -> str:
        try:
            check(value)
        except ApplianceError as exc:
            raise PydanticCustomError("invalid", str(exc)) from None
        return value

    return AfterValidator(validate)


def host_path(value: str) -> None:
    """A file the appliance writes on its own host: only a whole absolute path means one place there."""
    if not value.startswith("/") or "\x00" in value:
        raise UsageError(f"must be an absolute path on the appliance host, not {value!r}")


class Body(BaseModel):
    """A request body: no field the schema does not name, and booleans only as JSON booleans."""

    model_config = ConfigDict(extra="forbid")


VmName = Annotated[str, validated(VM_NAME.check), WithJsonSchema(VM_NAME.json_schema())]
SessionName = Annotated[str, validated(SESSION_NAME.check), WithJsonSchema(SESSION_NAME.json_schema())]
PointRef = Annotated[str, validated(POINT_REF.check), WithJsonSchema(POINT_REF.json_schema())]
JobId = Annotated[str, validated(JOB_ID.check), WithJsonSchema(JOB_ID.json_schema())]
VolumeRef = Annotated[str, validated(VOLUME_REF.check), WithJsonSchema(VOLUME_REF.json_schema())]
Verification = Annotated[str, validated(parse_verification),
                         WithJsonSchema({"type": "string", "pattern": verification_pattern()})]
HostPath = Annotated[str, validated(host_path), WithJsonSchema({"type": "string", "pattern": "^/[^\\x00]*$"})]


class SessionCreate(Body):
    vm: VmName = Field(description="VM whose restore point the session opens")
    point: PointRef = Field("latest", description="restore point id, unique prefix of one, or 'latest'")
    name: SessionName = Field(description="session name: a directory under /sessions of the datastore")
    expires_hours: float | None = Field(None, gt=0, description="end the session after this long "
                                        "(default: limits.session_expiry_hours)")


class SessionExport(Body):
    disk: int = Field(0, ge=0, description="disk number, 0 first")
    output: HostPath = Field(description="absolute path of a new file on the appliance host")


class InstantBootCreate(Body):
    """An instant boot. The target decides what else is needed, which the schema states with if/then/else:
    a vSphere boot (the default) names its ESXi host, and each target offers its own verifications."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "if": {"properties": {"target": {"const": "qemu"}}, "required": ["target"]},
        "then": {"properties": {"verify": {"pattern": offered_pattern("qemu")}}},
        "else": {"required": ["host"], "properties": {"host": {"type": "string"},
                                                      "verify": {"pattern": offered_pattern("vsphere")}}},
    })

    vm: VmName
    point: PointRef = "latest"
    target: Literal["vsphere", "qemu"] = "vsphere"
    session: SessionName | None = Field(None, description="session name (default: <vm>-<UTC time>)")
    host: str | None = Field(None, min_length=1, description="ESXi host to register the VM on (vsphere)")
    network: str | None = Field(None, description="port group every NIC is moved to (isolation)")
    connection: str | None = Field(None, description="vSphere connection name (default: the only one)")
    power_on: StrictBool = True
    verify: Verification = Field("none",
                        description="tools | ip | script:CMD (vsphere); console:TEXT | script:CMD (qemu); none")
    timeout: float = Field(600.0, gt=0, description="seconds to wait for the verification")
    memory_mib: int = Field(512, ge=64, description="guest memory (qemu)")
    accel: Literal["auto", "kvm", "tcg"] | None = Field(None, description="QEMU accelerator (qemu; default: the "
                                                        "configuration's qemu.accel)")
    keep: StrictBool = Field(False, description="on failure keep what was done, for inspection")
    expires_hours: float | None = Field(None, gt=0, description="stop (or migrate, per limits.expiry_action) "
                                        "after this long (default: limits.session_expiry_hours)")


    @model_validator(mode="after")
    def _fits_target(self) -> InstantBootCreate:
        if self.target == "vsphere" and self.host is None:
            raise PydanticCustomError("host", "a vSphere instant boot needs the ESXi host (host)")
        try:
            check_offered(self.target, parse_verification(self.verify))
        except UsageError as exc:
            raise PydanticCustomError("verify", str(exc)) from None
        return self


class MigrationCreate(Body):
    session: SessionName
    destination: str = Field(min_length=1, description="production datastore (vsphere) or directory on the "
                             "appliance host (qemu)")


class StopRequest(Body):
    commit: StrictBool = Field(False, description="store the session's disks as a new restore point before dropping it")


class RecoveryGroupRun(Body):
    plan: str = Field(description="the plan, TOML text")
    source: str = Field("plan", description="the plan's file name, for error messages")
    keep: StrictBool = Field(False, description="leave the VMs running after the report")


class PointRemoval(Body):
    points: list[PointRef] = Field(max_length=10_000, description="restore point ids (exact) to delete")


class ReplicationCreate(Body):
    remote: str = Field(min_length=1, max_length=100, description="a [[remotes]] entry of the configuration")
    direction: Literal["push", "pull"] = Field("push", description="push: this store's points to the remote; "
                                                                     "pull: the remote's points here")
    vms: list[VmName] | None = Field(None, min_length=1, description="only these VMs (default: all)")
    remove_vanished: StrictBool = Field(False, description="delete the target's points of these VMs that the "
                                        "source no longer has (points a session holds stay)")


class BackupCreate(Body):
    vm: VmName = Field(description="the VM's name in vSphere (and in the catalog)")
    connection: str | None = Field(None, min_length=1, max_length=100,
                                   description="a [[vsphere.connections]] name (default: the only one)")
    quiesce: Literal["yes", "try", "no"] = Field("try", description="quiesce the guest through VMware Tools: yes "
                                                 "(fail if it cannot), try (else a crash-consistent point), no")
    enable_cbt: StrictBool = Field(True, description="turn changed block tracking on if the VM lacks it (the next "
                                   "backup is then incremental)")
    streams: int = Field(4, ge=1, le=8, description="parallel HTTPS connections reading the disks")
