"""Security Validation: job-action rules, query windows, shared queries (engine), runners (file,
Kafka consumer group, and the ledger of what Kafka already holds)."""
