"""What operators see: Prometheus metrics, access and event logs, the admin endpoint (/metrics, /healthz, /status)."""
