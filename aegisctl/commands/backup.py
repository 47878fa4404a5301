"""`aegisctl backup FILE` and `aegisctl restore FILE`: the vault and the ledger, in one file.

The daemon streams a consistent snapshot and aegisctl writes it (0600, atomically), so the file
belongs to the operator and lands where the operator can write, whatever user aegisd runs as.
Restore streams the file back; the daemon checks all of it before replacing anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click

from aegisctl import output
from aegisctl.backup_file import CHUNK, read_manifest, verify_archive
from aegisctl.client import VAULT_STATES, ClientError
from aegisctl.context import Context, pass_context
from aegisctl.private_file import private_output
from aegisctl.secrets_input import confirm_destructive, read_secret
from aegisd.api.aegis.v1 import backup_pb2 as pb


def _summary(manifest: dict[str, object]) -> str:
    """The manifest in words, printable: it is the file's, and a crafted one may hold terminal escapes."""
    counts = manifest.get("counts")
    counts = counts if isinstance(counts, dict) else {}
    when = _when(manifest.get("created_ms"))
    return output.printable(f"vault {manifest.get('vault_id')} taken {when}: {counts.get('credentials', '?')} "
                            f"credentials, {counts.get('agents', '?')} agents, {counts.get('grants', '?')} grants, "
                            f"{counts.get('ledger_rows', '?')} ledger rows")


def _when(created: object) -> str:
    """The backup's creation time, or words saying it is unreadable: a manifest is the file's, not ours."""
    if isinstance(created, int) and not isinstance(created, bool):
        try:
            return output.iso_ms(created)
        except (ValueError, OverflowError, OSError):
            pass
    return "at an unknown time"


@click.command("backup")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the backup's manifest as JSON.")
@pass_context
def backup(ctx: Context, file: Path, as_json: bool) -> None:
    """Write a consistent snapshot of the vault and ledger to FILE (mode 0600; secrets stay encrypted).

    Works while the gate serves traffic and whether the vault is locked or not. FILE is replaced only
    once the whole backup has arrived and checks out.
    """
    client = ctx.client
    stream = client.backup.Backup(pb.BackupRequest())
    with private_output(file, text=False) as out:
        try:
            for chunk in client.stream(stream):
                out.file.write(chunk.data)
        except KeyboardInterrupt:
            stream.cancel()  # type: ignore[no-untyped-call]
            raise
        out.file.flush()
        manifest = verify_archive(out.temp_path)  # an interrupted stream never becomes FILE
    if as_json:
        output.emit_json({"file": str(file), **manifest})
    else:
        written = output.printable(f"Backup written to {file} ({file.stat().st_size} bytes)")
        click.echo(f"{written}: {_summary(manifest)}.")


@click.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
@click.option("--passphrase-stdin", is_flag=True,
              help="Read the passphrase of the vault in place (needed for another vault's backup) from stdin.")
@pass_context
def restore(ctx: Context, file: Path, yes: bool, passphrase_stdin: bool) -> None:
    """Replace the daemon's vault and ledger with the backup in FILE.

    The vault must be locked (or not yet created): run `aegisctl lock` first. Afterwards it is locked. A
    backup of the vault in place keeps the vault's current passphrase and unlock keys; another vault's
    backup opens with the passphrase it had, and replacing an existing vault with it needs that existing
    vault's passphrase. A damaged file is refused and nothing changes.
    """
    manifest = read_manifest(file)
    client = ctx.client
    status = client.status()
    state = VAULT_STATES.get(status.state)
    if state == "unlocked":
        raise ClientError("the vault is unlocked; restore replaces it, so it must be locked first",
                          "run `aegisctl lock`, then `aegisctl restore` again", "vault_unlocked")
    other_vault = state != "uninitialized" and manifest.get("vault_id") != status.vault_id
    what = "another vault's backup, " if other_vault else "the backup of "
    confirm_destructive(output.printable(f"Replace the vault and ledger in {status.data_dir} with {what}")
                        + f"{_summary(manifest)}?", yes)
    passphrase = (read_secret("passphrase of the vault in place", passphrase_stdin, flag="--passphrase-stdin")
                  if other_vault else "")

    def chunks() -> Iterator[pb.RestoreChunk]:
        first = True
        with file.open("rb") as fh:
            while data := fh.read(CHUNK):
                yield pb.RestoreChunk(data=data, passphrase=passphrase if first else "")
                first = False

    reply = client.call(client.backup.Restore, chunks(), timeout=3600)
    click.echo(output.printable(f"Restored vault {reply.vault_id} (backup taken {_when(reply.created_ms)}): "
                                f"{reply.credentials} credentials, {reply.agents} agents, {reply.ledger_rows} ledger "
                                "rows."))
    if reply.kept_key_slots:
        click.echo("The vault is locked: it kept its current passphrase and unlock keys (`aegisctl unlock`).")
    else:
        click.echo("The vault is locked: unlock it with the backup's passphrase (`aegisctl unlock`).")


commands = (backup, restore)
