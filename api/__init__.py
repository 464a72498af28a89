"""The FastAPI service answering predictive-uncertainty queries (imports zoo, never the reverse)."""
