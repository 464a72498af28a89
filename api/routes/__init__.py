"""The routers, one per resource: health, v1 (JSON + multipart), v2 (Open Inference Protocol), page, metrics."""
