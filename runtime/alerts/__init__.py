"""Alert rules over caption records, and the targets they fire (webhooks, commands, MQTT)."""

from .rules import Alerts

__all__ = ["Alerts"]
