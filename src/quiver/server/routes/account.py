"""Who the caller is: ``whoami``, as the client's ``HfApi.whoami`` reads it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from quiver.server.deps import Caller
from quiver.server.errors import Unauthorized

router = APIRouter()


@router.get("/api/whoami-v2")
def whoami(caller: Caller) -> dict[str, Any]:
    if caller is None:
        raise Unauthorized("whoami needs a token", hint="pass a token")
    role = "write" if caller.write else "read"
    return {
        "type": "user",
        "name": caller.user,
        "fullname": caller.user,
        "avatarUrl": "",
        "orgs": [{"type": "org", "name": org, "fullname": org} for org in caller.orgs],
        "auth": {"type": "access_token", "accessToken": {"displayName": "quiver", "role": role}},
    }
