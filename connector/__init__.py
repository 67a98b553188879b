"""Tanium Threat Response → Kafka connector."""

__version__ = "0.1.0"
