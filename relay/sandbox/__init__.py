"""Loopback-only stand-ins for Exchange Online and Entra ID, for the demo and tests."""
