"""Randomized-response telemetry: store.py (counts, never an answer), service.py (checks, de-biased
rates), routes.py (HTTP)."""
from server.telemetry.service import Telemetry

__all__ = ["Telemetry"]
