"""Integrations of the fused loss into other trainers (``opsdl.integrations.trl``: TRL)."""
