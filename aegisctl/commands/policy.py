"""`aegisctl policy validate|list|test|reload`: the YAML rules that narrow what each agent may do.

aegisctl never interprets a policy itself: `validate` sends the files' bytes to aegisd, which
answers with every issue it finds, checking them with the files it has loaded as if they were dropped
into its policy directory, so what passes here is what the gate would load.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from google.protobuf.timestamp_pb2 import Timestamp

from aegisctl import output
from aegisctl.client import ClientError
from aegisctl.context import Context, pass_context
from aegisctl.timespec import TimeSpec
from aegisd.api.aegis.v1 import policy_pb2 as pb

SUFFIXES = (".yaml", ".yml")
# aegisd's limit on one policy file (MAX_POLICY_BYTES in aegisd/policy/parse.py; aegisctl imports only the API
# stubs from aegisd): a larger file is refused here, before it is read whole or sent.
MAX_POLICY_BYTES = 1024 * 1024
# The largest request aegisd's control server takes: gRPC's default receive limit, which it keeps. All files
# go in one request, so that aegisd checks them together (two files for one agent must agree).
MAX_REQUEST_BYTES = 4 * 1024 * 1024


def issue_json(i: pb.PolicyIssue) -> dict[str, Any]:
    return {"file": i.file, "line": i.line, "column": i.column, "field": i.field, "message": i.message}


def issue_line(i: pb.PolicyIssue) -> str:
    where = f"{i.file}:{i.line}:{i.column}" if i.line else i.file
    return output.printable(f"{where}: {i.field}: {i.message}" if i.field else f"{where}: {i.message}")


def warning_line(w: pb.PolicyIssue) -> str:
    """`warning: FILE[:LINE:COL]: [FIELD: ]MESSAGE`: a name the daemon does not know; not an error."""
    return "warning: " + issue_line(w)


def file_json(f: pb.PolicyFileStatus) -> dict[str, Any]:
    return {"name": f.name, "agent": f.agent or None, "mode": f.mode, "rules": f.rules, "valid": not f.issues,
            "issues": [issue_json(i) for i in f.issues], "warnings": [issue_json(w) for w in f.warnings]}


def status_json(s: pb.PolicyStatus) -> dict[str, Any]:
    return {
        "directory": s.directory or None,
        "loaded_at": output.iso(s.loaded_at) if s.HasField("loaded_at") else None,
        "trigger": s.trigger or None,
        "reloads": s.reloads,
        "error": s.error or None,
        "fail_all": list(s.fail_all),
        "files": [file_json(f) for f in s.files],
        "agents": [{"agent": a.agent, "state": a.state, "files": list(a.files), "rules": a.rules,
                    "services": list(a.services)} for a in s.agents],
    }


@click.group("policy")
def command() -> None:
    """Check, list, test and reload policy files (the daemon's --policies-dir)."""


def _sources(paths: tuple[str, ...]) -> list[pb.PolicySource]:
    sources = []
    for text in paths:
        path = Path(text)
        try:
            found = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and not p.name.startswith(".")) \
                if path.is_dir() else [path]
        except OSError as exc:  # a directory that cannot be listed: say so, as for a file that cannot be read
            raise click.UsageError(output.printable(f"cannot read {path}: {exc.strerror}")) from None
        for item in found:
            try:
                # A name that is not UTF-8 (bytes Python decoded with surrogateescape) cannot be sent as it is:
                # its undecodable bytes go as \xNN, as aegisctl shows other unprintable characters.
                name = str(item).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                with item.open("rb") as fh:
                    content = fh.read(MAX_POLICY_BYTES + 1)
            except OSError as exc:
                raise click.UsageError(output.printable(f"cannot read {item}: {exc.strerror}")) from None
            if len(content) > MAX_POLICY_BYTES:
                raise ClientError(output.printable(f"{item} is larger than {MAX_POLICY_BYTES // 1024} KiB, aegisd's "
                                                   "limit for a policy file; nothing was sent"),
                                  "make it smaller, or split its rules across files", "invalid_argument")
            sources.append(pb.PolicySource(name=name, content=content))
    if not sources:
        raise click.UsageError("no policy files (*.yaml, *.yml) in the paths given")
    size = pb.ValidatePoliciesRequest(files=sources).ByteSize()
    if size > MAX_REQUEST_BYTES:
        raise ClientError(f"the {len(sources)} policy files come to {size // 1024} KiB, more than the "
                          f"{MAX_REQUEST_BYTES // 1024} KiB one request to aegisd can carry; nothing was sent",
                          "validate them in smaller groups (the files naming one agent in the same group)",
                          "invalid_argument")
    return sources


@command.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True), metavar="PATH...")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of files and their issues.")
@pass_context
def validate(ctx: Context, paths: tuple[str, ...], as_json: bool) -> None:
    """Check policy files (or every *.yaml / *.yml in a directory) and print every error at once.

    Files are checked by the running aegisd as it would load them dropped into its policy directory:
    with the files loaded from there, each file sent replacing the loaded one of its name. They do not
    have to be in that directory. Exit status 1 if any file has an error. A file naming an agent that is not
    registered, or a service no credential provides, gets a warning line (likely a typo); warnings alone
    exit 0.
    """
    client = ctx.client
    reply = client.call(client.policies.Validate, pb.ValidatePoliciesRequest(files=_sources(paths)))
    if as_json:
        output.emit_json([file_json(f) for f in reply.files])
    else:
        for f in reply.files:
            if f.issues:
                for issue in f.issues:
                    click.echo(issue_line(issue))
            else:
                click.echo(output.printable(f"{f.name}: ok (agent {f.agent}, {f.rules} rules, {f.mode})"))
            for warning in f.warnings:
                click.echo(warning_line(warning))
    bad = [f for f in reply.files if f.issues]
    if bad:
        errors = sum(len(f.issues) for f in bad)
        click.echo(f"aegisctl: {errors} error(s) in {len(bad)} of {len(reply.files)} file(s)", err=True)
        sys.exit(1)


@command.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def list_(ctx: Context, as_json: bool) -> None:
    """Show the loaded policy files and agents, their modes, rule counts, errors and warnings."""
    client = ctx.client
    _print_status(client.call(client.policies.List, pb.ListPoliciesRequest()), as_json)


@command.command("reload")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def reload(ctx: Context, as_json: bool) -> None:
    """Re-read the policy directory now (aegisd also reloads on SIGHUP and when files change).

    An invalid file makes the agents it names fail closed (403 policy_invalid) while the other
    agents keep their policies. Exit status 1 if any file is invalid.
    """
    client = ctx.client
    status = client.call(client.policies.Reload, pb.ReloadPoliciesRequest())
    _print_status(status, as_json)
    if status.error:  # nothing was loaded: the files listed are the ones still in force
        if not as_json:
            click.echo("aegisctl: the policy directory could not be read; the previous policies stay in force",
                       err=True)
        sys.exit(1)
    if any(f.issues for f in status.files):
        if not as_json:
            click.echo("aegisctl: reloaded with errors; the agents named above fail closed until they are fixed",
                       err=True)
        sys.exit(1)


def _print_status(status: pb.PolicyStatus, as_json: bool) -> None:
    if as_json:
        output.emit_json(status_json(status))
        return
    if not status.directory:
        click.echo("No policy directory is configured: every agent is governed by its grants and scopes only.")
        click.echo("Set one with aegisd --policies-dir, AEGIS_POLICIES_DIR or [policy] dir in the config.")
        return
    loaded = output.iso(status.loaded_at) if status.HasField("loaded_at") else None
    output.fields([("directory", status.directory), ("loaded", f"{loaded} ({status.trigger})"),
                   ("reloads", status.reloads)])
    if status.error:
        click.echo(f"error: {output.printable(status.error)}")
    click.echo()
    if not status.files:
        click.echo("No policy files (*.yaml, *.yml) in the directory.")
    else:
        output.table(["FILE", "AGENT", "MODE", "RULES", "STATUS"],
                     [[f.name, f.agent, f.mode, f.rules, _file_state(f)] for f in status.files])
    if status.agents:
        click.echo()
        output.table(["AGENT", "STATE", "RULES", "SERVICES", "FILES"],
                     [[a.agent, a.state, a.rules, ",".join(a.services), ",".join(a.files)] for a in status.agents])
    issues = [i for f in status.files for i in f.issues]
    if issues:
        click.echo()
        for issue in issues:
            click.echo(issue_line(issue))
    warnings = [w for f in status.files for w in f.warnings]
    if warnings:
        click.echo()
        for warning in warnings:
            click.echo(warning_line(warning))
    if status.fail_all:
        click.echo()
        files = output.printable(", ".join(status.fail_all))
        click.echo(f"EVERY agent fails closed: the agent of {files} cannot be determined.")


def _rule_json(ref: pb.PolicyRuleRef) -> dict[str, Any]:
    return {"file": ref.file, "index": ref.index, "line": ref.line, "ref": ref.ref}


def _file_state(f: pb.PolicyFileStatus) -> str:
    state = f"{len(f.issues)} error(s)" if f.issues else "ok"
    return state + (f", {len(f.warnings)} warning(s)" if f.warnings else "")


@command.command("test")
@click.option("--agent", required=True, help="Agent name.")
@click.option("--service", required=True, help="Service (the first path segment at the gate).")
@click.option("--method", required=True, help="HTTP method, e.g. GET or PROPFIND.")
@click.option("--path", "path", required=True, help="Path after the service, e.g. /repos/acme/x.")
@click.option("--at", "at_ms", type=TimeSpec(),
              help="Judge at this time instead of now: ISO 8601, UTC unless it names an offset (2030-01-01T09:00, "
              "2030-01-01T09:00+01:00), or an age, meaning that long ago (45m: 45 minutes ago).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def test_request(ctx: Context, agent: str, service: str, method: str, path: str, at_ms: int | None,
         as_json: bool) -> None:
    """Show how the loaded policies judge one request, and which rule decided.

    The path is taken as the gate takes it (a path its front door refuses is an error). Only the policy
    step: the agent's grants and the credential's scopes are checked separately.
    """
    client = ctx.client
    # Always sent, now included: the instant printed is then the one aegisd judged, whatever --at was given as.
    judged_ms = at_ms if at_ms is not None else time.time_ns() // 1_000_000
    stamp = Timestamp()
    stamp.FromMilliseconds(judged_ms)
    request = pb.TestPolicyRequest(agent=agent, service=service, method=method, path=path, at=stamp)
    reply = client.call(client.policies.Test, request)
    judged_at = output.iso_ms(judged_ms)
    rule = _rule_json(reply.rule) if reply.HasField("rule") else None
    also = _rule_json(reply.also) if reply.HasField("also") else None
    if as_json:
        output.emit_json({"decision": reply.decision, "at": judged_at, "mode": reply.mode or None, "rule": rule,
                          "reason": reply.reason, "rate_limit": reply.rate_limit or None,
                          "also": also, "also_rate_limit": reply.also_rate_limit or None,
                          "warnings": list(reply.warnings)})
        return
    headline = reply.decision
    if reply.mode == "dry-run" and reply.decision == "denied":
        headline += " (dry-run: forwarded, logged as would_deny)"
    pairs: list[tuple[str, Any]] = [("decision", headline), ("at", judged_at)]
    if rule is not None:
        pairs.append(("rule", f"{rule['ref']} (line {rule['line']})"))
    if reply.rate_limit:
        pairs.append(("rate limit", reply.rate_limit))
    if also is not None:
        pairs.append(("also held to", f"{also['ref']} (line {also['line']})"))
        if reply.also_rate_limit:
            pairs.append(("its rate limit", reply.also_rate_limit))
    pairs.append(("reason", reply.reason))
    pairs.extend(("warning", warning) for warning in reply.warnings)
    output.fields(pairs)
