"""epp-mail-relay: a durable SMTP relay sidecar for legacy services."""

__version__ = "0.1.0"
