"""Every endpoint the server answers, by name."""

from . import workers

ENDPOINTS = {**workers.ENDPOINTS}
