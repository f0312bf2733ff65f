"""What the server says about itself: Prometheus metrics from core events and the relay's
counters (`metrics`), their merge rules across worker processes (`worker_metrics`), the
HTTP services' counters (`service_metrics`), the event log (`eventlog`), the self-probe
(`probe`) and the certificate check (`certcheck`)."""
