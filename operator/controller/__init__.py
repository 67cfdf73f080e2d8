"""kopf operator reconciling the AlignedServe custom resource. Never imports torch."""
