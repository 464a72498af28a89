"""Builders: compute and publish the priors of pretrained timm models (imports zoo, never the reverse)."""
