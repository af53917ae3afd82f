"""Mamba scan ops: S6 selective scan (Mamba-1) and SSD (Mamba-2), with single-token decode steps."""

from kernels.mamba.ops import selective_scan, selective_scan_step, ssd, ssd_step

__all__ = ["selective_scan", "selective_scan_step", "ssd", "ssd_step"]
