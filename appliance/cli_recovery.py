"""CLI commands that run VMs from backups: instant-boot, migrate, stop, recovery-group,
discover, jobs. Each asks the running `appliance serve` (its HTTP API) to do the work
as a job, then follows the job: a line per step on stderr, the result on stdout, exit
status 0 only when the job succeeded. They need the server because the hypervisor
reads the VM's disks from its NFS export for as long as the VM runs from the backup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli_args import JOB_ARG, POINT_ARG, SESSION_ARG, VM_ARG, Command
from appliance.errors import ApplianceError, UsageError
from appliance.hypervisor.accel import ACCELERATORS

if TYPE_CHECKING:
    from appliance.api.client import ApiClient



def server_client(args: argparse.Namespace) -> ApiClient:
    from appliance.api.client import ApiClient  # httpx: imported by the commands that talk to a server

    if not args.store:
        raise UsageError("no store given: pass --store DIR or set APPLIANCE_STORE")
    client = ApiClient.for_store(Path(args.store))
    if client is None:
        raise ApplianceError(
            f"no `appliance serve` runs for {args.store}: start it first (the hypervisor reads the VM's "
            "disks from its NFS server, and it runs the jobs)")
    return client


class StepPrinter:
    """Prints each step of a job once, as it finishes, to stderr."""

    def __init__(self) -> None:
        self._printed = 0

    def __call__(self, job: dict[str, Any]) -> None:
        for step in job["steps"][self._printed:]:
            if step["finished"] is None:
                break
            seconds = f"{step['seconds']:.1f}s"
            detail = f"  {step['detail']}" if step["detail"] else ""
            print(f"  {step['verdict']:<9} {seconds:>8}  {step['name']}{detail}", file=sys.stderr)
            self._printed += 1


def follow(client: ApiClient, job: dict[str, Any], as_json: bool, detach: bool = False,
           render: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Wait for a submitted job, printing its steps; 0 when it succeeded."""
    print(f"job {job['id']} ({job['kind']}) started", file=sys.stderr)
    if detach:
        print(json.dumps(job) if as_json else job["id"])
        return 0
    done = client.wait_job(job["id"], on_change=None if as_json else StepPrinter())
    if as_json:
        print(json.dumps(done, indent=2))
    elif done["result"] is not None:
        (render or _print_result)(done["result"])
    if done["state"] != "succeeded":
        print(f"appliance: error: job {done['id']} {done['state']}: {done['error']}", file=sys.stderr)
        return 1
    return 0


def _print_result(result: dict[str, Any]) -> None:
    for key, value in result.items():
        print(f"{key}: {value}")


def _print_group_report(result: dict[str, Any]) -> None:
    print(f"recovery group {result['group']}: {result['verdict']}{' (kept running)' if result['kept'] else ''}")
    print(f"{'VM':<20} {'VERDICT':<8} {'SECONDS':>8}  STEPS")
    for vm in result["vms"]:
        steps = ", ".join(f"{s['name']} {s['verdict']} {s['seconds']}s" for s in vm["steps"]) or vm.get("reason", "")
        print(f"{vm['vm']:<20} {vm['verdict']:<8} {vm.get('seconds', 0):>8.1f}  {steps}")


def cmd_instant_boot(args: argparse.Namespace) -> int:
    body = {"vm": args.vm, "point": args.point, "target": "qemu" if args.qemu else "vsphere",
            "session": args.session, "host": args.host, "network": args.network, "connection": args.connection,
            "power_on": not args.no_power_on, "verify": args.verify, "timeout": args.timeout,
            "memory_mib": args.memory, "accel": args.accel, "keep": args.keep, "expires_hours": args.expires_hours}
    with server_client(args) as client:
        return follow(client, client.call("POST", "/instant-boots", body), args.json, args.detach)


def cmd_migrate(args: argparse.Namespace) -> int:
    if bool(args.datastore) == bool(args.to_path):
        raise UsageError("give --datastore PRODUCTION_DS (vSphere) or --to-path DIR (QEMU)")
    destination = args.datastore or os.path.abspath(args.to_path)
    with server_client(args) as client:
        job = client.call("POST", "/migrations", {"session": args.session, "destination": destination})
        return follow(client, job, args.json, args.detach)


def cmd_stop(args: argparse.Namespace) -> int:
    with server_client(args) as client:
        job = client.call("POST", f"/sessions/{args.session}/stop", {"commit": args.commit})
        return follow(client, job, args.json, args.detach)


def cmd_recovery_group(args: argparse.Namespace) -> int:
    plan = Path(args.plan)
    try:
        text = plan.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read plan {plan}: {exc.strerror}") from None
    with server_client(args) as client:
        job = client.call("POST", "/recovery-groups", {"plan": text, "source": str(plan), "keep": args.keep})
        return follow(client, job, args.json, args.detach, render=_print_group_report)


def cmd_discover(args: argparse.Namespace) -> int:
    query = f"?connection={args.connection}" if args.connection else ""
    with server_client(args) as client:
        found = client.call("GET", f"/discover{query}")
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"{'STATUS':<12} {'VM':<28} {'POWER':<11} {'NEWEST POINT':<22} {'AGE (h)':>8}  POLICY")
    for row in found:
        age = "-" if row["age_hours"] is None else f"{row['age_hours']:.1f}"
        print(f"{row['status']:<12} {row['vm']:<28} {row['power_state']:<11} {row['newest_point'] or '-':<22} "
              f"{age:>8}  {row['policy']}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with server_client(args) as client:
        if args.jobs_command == "show":
            job = client.call("GET", f"/jobs/{args.id}")
            if args.json:
                print(json.dumps(job, indent=2))
            else:
                StepPrinter()(job)
                print("\n".join(job["log"]))
                print(f"state: {job['state']}" + (f" ({job['error']})" if job["error"] else ""))
        elif args.jobs_command == "cancel":
            client.call("POST", f"/jobs/{args.id}/cancel")
            print(f"asked job {args.id} to stop", file=sys.stderr)
        else:
            found = client.call("GET", "/jobs")
            if args.json:
                print(json.dumps(found, indent=2))
                return 0
            print(f"{'JOB':<24} {'KIND':<16} {'STATE':<12} {'CREATED (UTC)':<20} ERROR")
            for job in found:
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job["created"]))
                print(f"{job['id']:<24} {job['kind']:<16} {job['state']:<12} {created:<20} {job['error'] or ''}")
    return 0


def _job_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="print the whole job record as JSON when it ends")
    sub.add_argument("--detach", action="store_true", help="print the job id and return at once")


def add_job_actions(sub: argparse.ArgumentParser, list_help: str, cancel_help: str) -> None:
    """`list` (the default), `show ID` and `cancel ID`, for a command over jobs of the running appliance."""
    actions = sub.add_subparsers(dest="jobs_command", metavar="ACTION")
    action = actions.add_parser("list", help=list_help)
    action.add_argument("--json", action="store_true")
    action = actions.add_parser("show", help="one job's steps, log and state")
    action.add_argument("id", type=JOB_ARG)
    action.add_argument("--json", action="store_true")
    action = actions.add_parser("cancel", help=cancel_help)
    action.add_argument("id", type=JOB_ARG)
    sub.set_defaults(json=False)


def register(command: Command) -> None:
    """Add these commands to the `appliance` parser."""
    sub = command("instant-boot", cmd_instant_boot, "run a VM from a restore point (vSphere or local QEMU)")
    sub.add_argument("--vm", required=True, type=VM_ARG)
    sub.add_argument("--point", default="latest", type=POINT_ARG, help="point id, unique prefix, or latest (default)")
    target = sub.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", metavar="ESXI_HOST", help="ESXi host to register and power on the VM on")
    target.add_argument("--qemu", action="store_true", help="boot on this machine with qemu-system-x86_64")
    sub.add_argument("--network", metavar="PORTGROUP", help="move every NIC to this (isolated) port group")
    sub.add_argument("--connection", metavar="NAME", help="vSphere connection of the configuration (default: the only one)")
    sub.add_argument("--session", metavar="NAME", type=SESSION_ARG, help="session name (default: <vm>-<UTC time>)")
    sub.add_argument("--no-power-on", action="store_true", help="register only")
    sub.add_argument("--verify", default="none", metavar="HOW", help="tools | ip | script:CMD | console:TEXT | none")
    sub.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds for the verification")
    sub.add_argument("--memory", type=int, default=512, metavar="MiB", help="guest memory with --qemu")
    sub.add_argument("--accel", choices=ACCELERATORS, help="QEMU accelerator with --qemu (default: the serving "
                     "appliance's qemu.accel, auto unless configured)")
    sub.add_argument("--keep", action="store_true", help="on failure leave everything for inspection")
    sub.add_argument("--expires-hours", type=float, metavar="H",
                     help="stop (or migrate, per limits.expiry_action) after H hours")
    _job_flags(sub)

    sub = command("migrate", cmd_migrate, "move a running VM to production storage, then drop its session")
    sub.add_argument("session", type=SESSION_ARG)
    sub.add_argument("--datastore", metavar="PRODUCTION_DS", help="Storage vMotion target (vSphere)")
    sub.add_argument("--to-path", metavar="DIR", help="directory for the disks' local copies (QEMU)")
    _job_flags(sub)

    sub = command("stop", cmd_stop, "power off and unregister a session's VM, then drop (or commit) the session")
    sub.add_argument("session", type=SESSION_ARG)
    sub.add_argument("--commit", action="store_true", help="store the session's disks as a new restore point first")
    _job_flags(sub)

    sub = command("recovery-group", cmd_recovery_group, "boot a plan of VMs in order, verify them, report")
    actions = sub.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    action = actions.add_parser("run", help="run PLAN.toml")
    action.add_argument("plan", metavar="PLAN.toml")
    action.add_argument("--keep", action="store_true", help="leave the VMs running after the report")
    _job_flags(action)

    sub = command("discover", cmd_discover, "every VM in vCenter: unprotected first, then stale, then protected")
    sub.add_argument("--connection", metavar="NAME", help="vSphere connection (default: the only one)")
    sub.add_argument("--json", action="store_true")

    add_job_actions(command("jobs", cmd_jobs, "jobs of the running appliance"), "every job (the default)",
                    "ask a job to stop (it undoes what it did)")
