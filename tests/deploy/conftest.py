"""Deployment artefacts: Dockerfile, compose, Kubernetes manifests, Grafana dashboard, Prometheus rules
(promtool), and a live Prometheus scraping the connector."""
