"""Unit tests: one part at a time, the simulator over HTTP where a part talks to Tanium; no broker,
no subprocess of the connector (`make test-fast`)."""
