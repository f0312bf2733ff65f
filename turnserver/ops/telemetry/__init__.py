"""What the server says about itself: Prometheus metrics from core events and the relay's
counters (`metrics`), their merge rules across worker processes (`worker_metrics`), the
HTTP services' counters (`service_metrics`), the event log (`eventlog`), the self-probe
(`probe`), the certificate check (`certcheck`), per-tenant series (`tenant_metrics`) and
the process_* figures without a descriptor listing per scrape (`process_figures`)."""
