"""Tools around the connector: connectivity check, demo, benchmark, embedded broker."""
