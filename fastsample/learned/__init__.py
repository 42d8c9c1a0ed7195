"""Learned / estimated solver ingredients."""

from .ems import EMS, estimate_ems

__all__ = ["EMS", "estimate_ems"]
