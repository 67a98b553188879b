"""Security Validation: job-action rules and windows (rules), shared queries (engine), runners (file,
Kafka consumer group, and the ledger of what Kafka already holds)."""
