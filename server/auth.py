"""Who is calling: the company (tenant) and user every request acts as.

Until credentials exist, every request acts as the configured default company and user;
the rest of the service already takes the identity as a parameter.
"""

from dataclasses import dataclass

from aiohttp import web

from .keys import SETTINGS


@dataclass(frozen=True)
class Identity:
    company: str
    user: str


async def identify(request: web.Request) -> Identity:
    settings = request.app[SETTINGS]
    return Identity(company=settings.default_company, user=settings.default_user)
