"""Between daemon objects and API messages. Nothing secret has a field to go into."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from aegisd.api.aegis.v1 import credentials_pb2 as pb
from aegisd.errors import InvalidArgument
from aegisd.vault.credentials import Credential
from aegisd.vault.sealing import NOT_ADOPTED, OK, TAMPERED, UNCHECKED

AUTH_TO_PB = {"bearer": pb.AUTH_TYPE_BEARER, "header": pb.AUTH_TYPE_HEADER, "basic": pb.AUTH_TYPE_BASIC,
              "query": pb.AUTH_TYPE_QUERY}
AUTH_FROM_PB: dict[int, str] = {v: k for k, v in AUTH_TO_PB.items()}
INSPECTION_TO_PB = {"off": pb.BODY_INSPECTION_OFF, "warn": pb.BODY_INSPECTION_WARN,
                    "block": pb.BODY_INSPECTION_BLOCK}
INSPECTION_FROM_PB: dict[int, str] = {v: k for k, v in INSPECTION_TO_PB.items()}


def timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


INTEGRITY_TO_PB = {OK: pb.INTEGRITY_OK, UNCHECKED: pb.INTEGRITY_UNCHECKED, TAMPERED: pb.INTEGRITY_TAMPERED,
                   NOT_ADOPTED: pb.INTEGRITY_NOT_ADOPTED}


def credential_to_pb(cred: Credential, now_ms: int, integrity: str = OK) -> pb.Credential:
    """A credential as the API shows it; `integrity` is its SealCheck status (OK for one just sealed)."""
    msg = pb.Credential(
        integrity=INTEGRITY_TO_PB[integrity],
        id=cred.id, name=cred.name, service=cred.service, domains=cred.domains,
        auth_type=AUTH_TO_PB.get(cred.auth_type, pb.AUTH_TYPE_UNSPECIFIED), header_name=cred.header_name,
        query_param=cred.query_param, scopes=cred.scopes, rate_limit=cred.rate_limit,
        body_inspection=INSPECTION_TO_PB.get(cred.body_inspection, pb.BODY_INSPECTION_UNSPECIFIED),
        created_at=timestamp(cred.created_at), updated_at=timestamp(cred.updated_at),
        rotated_at=timestamp(cred.rotated_at), expired=cred.expired(now_ms),
    )
    if cred.expires_at is not None:
        msg.expires_at.CopyFrom(timestamp(cred.expires_at))
    return msg


def auth_from_pb(value: int, default: str = "bearer") -> str:
    if value == pb.AUTH_TYPE_UNSPECIFIED:
        return default
    if value not in AUTH_FROM_PB:
        raise InvalidArgument(f"unknown auth type {value}")
    return AUTH_FROM_PB[value]


def inspection_from_pb(value: int, default: str = "block") -> str:
    if value == pb.BODY_INSPECTION_UNSPECIFIED:
        return default
    if value not in INSPECTION_FROM_PB:
        raise InvalidArgument(f"unknown body inspection mode {value}")
    return INSPECTION_FROM_PB[value]


def expiry(ttl_seconds: int, now_ms: int) -> int | None:
    return now_ms + ttl_seconds * 1000 if ttl_seconds else None


def credential_changes(req: pb.UpdateCredentialRequest, now_ms: int) -> dict[str, Any]:
    """The fields an update request sets, as Credential attribute changes."""
    changes: dict[str, Any] = {}
    if req.HasField("service"):
        changes["service"] = req.service
    if req.set_domains:
        changes["domains"] = list(req.domains)
    if req.HasField("auth_type"):
        changes["auth_type"] = auth_from_pb(req.auth_type)
        changes.setdefault("header_name", "")
        changes.setdefault("query_param", "")
    if req.HasField("header_name"):
        changes["header_name"] = req.header_name
    if req.HasField("query_param"):
        changes["query_param"] = req.query_param
    if req.set_scopes:
        changes["scopes"] = list(req.scopes)
    if req.HasField("ttl_seconds"):
        changes["expires_at"] = expiry(req.ttl_seconds, now_ms)
    if req.HasField("rate_limit"):
        changes["rate_limit"] = req.rate_limit
    if req.HasField("body_inspection"):
        changes["body_inspection"] = inspection_from_pb(req.body_inspection)
    if not changes:
        raise InvalidArgument("nothing to update: name at least one field to change")
    return changes
