"""The status page, its JSON API, job submission over HTTP, Prometheus metrics, webhooks."""
