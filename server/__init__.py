"""Workers telemetry service: registrations and machine statistics of compute-worker daemons."""

__version__ = "0.1.0"
