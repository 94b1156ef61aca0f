"""Every endpoint the server answers, by name."""

from . import login, queues, runtime_properties, workers

ENDPOINTS = {**login.ENDPOINTS, **workers.ENDPOINTS, **runtime_properties.ENDPOINTS, **queues.ENDPOINTS}
