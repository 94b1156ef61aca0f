"""Every endpoint the server answers, by name."""

from . import login, workers

ENDPOINTS = {**login.ENDPOINTS, **workers.ENDPOINTS}
