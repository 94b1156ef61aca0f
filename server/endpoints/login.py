"""`auth.login`: a token for the caller's credentials (SPEC §1, Authentication and tenancy)."""

from .. import auth, schemas
from ..keys import SIGNING_KEY
from ..protocol import API_VERSION, SERVER_VERSION, Call


async def login(call: Call) -> dict:
    # The real daemon sends expiration_sec, when configured to, as a query parameter; the
    # body's, if any, wins. Each is validated on its own.
    text = call.request.query.get("expiration_sec")
    query = {} if text is None else {"expiration_sec": int(text) if text.isascii() and text.isdigit() else text}
    body = {**schemas.load(schemas.login_request, query), **schemas.load(schemas.login_request, call.body)}
    longest = call.settings.token_lifetime_seconds
    lifetime = min(body.get("expiration_sec") or longest, longest)
    token = auth.issue_token(
        call.identity,
        call.request.app[SIGNING_KEY],
        lifetime,
        api_version=API_VERSION,
        server_version=SERVER_VERSION,
    )
    return {"token": token}


ENDPOINTS = {"auth.login": login}
