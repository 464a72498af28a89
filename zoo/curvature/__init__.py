"""Curvature of a trained network on data: K-FAC (and K-FOC) blocks per module, plain tensors in and out."""

from __future__ import annotations

from zoo.curvature.blocks import Block, DiagonalBlock, KronBlock
from zoo.curvature.kfac import KFACResult, kfac
from zoo.curvature.kfoc import kfoc

__all__ = ["Block", "DiagonalBlock", "KFACResult", "KronBlock", "kfac", "kfoc"]
