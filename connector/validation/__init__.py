"""Security Validation: job-action rules and windows (rules), shared queries (engine), runners."""
